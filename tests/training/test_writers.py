"""Metrics to TensorBoard (real event files, read back) and to W&B (a stand-in module)."""

import io
import json
import pathlib
import struct
import sys
import types

import pytest

import spdjax
from helpers import shared_train_steps
from spdjax.config import files as configs
from spdjax.training import loop
from spdjax.training.progress import log_to


def tms_config(**overrides):
    return configs.load("tms:5-2", {"steps": 20, "batch_size": 64, "eval_batch_size": 512,
                                    "log_every": 10, "checkpoint_every": 10, **overrides})


def run(config, workdir, **kw):
    with log_to(io.StringIO()):
        return spdjax.train_and_evaluate(config, workdir, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_step_per_config():
    """Runs of one config (every field) share one compiled train step (helpers.py)."""
    with shared_train_steps():
        yield


def read_events(logdir: pathlib.Path) -> list:
    """Every Event of the TFRecord event files in ``logdir`` (length-prefixed protos)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])  # after length and its crc
            events.append(event)
            i += 12 + n + 4  # payload and its crc
    return events


def test_tensorboard_event_files_hold_the_scalars_and_figures(tmp_path):
    # A run stopped after step 2 and resumed by train_and_evaluate: both writers' lines, the
    # resume point and the final figures in one event log (one config: one compiled step).
    config = tms_config(tensorboard=True, steps=4, log_every=2, checkpoint_every=2,
                        eval_batch_size=64)
    with log_to(io.StringIO()):
        stopped = spdjax.setup(config, tmp_path)
        loop.train(stopped, until_step=2)
        loop.close(stopped)
    assert len(read_events(tmp_path / "tensorboard")) > 0  # written before the resume
    run(config, tmp_path)
    events = read_events(tmp_path / "tensorboard")
    scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value
               if v.HasField("simple_value")}
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in jsonl] == [2, 4]
    for row in jsonl:  # every metric line, to float32 precision
        assert scalars[("loss/total", row["step"])] == pytest.approx(row["loss/total"], rel=1e-6)
    images = {v.tag for e in events for v in e.summary.value if v.HasField("image")}
    assert {"figures/combined_diagram", "figures/training_curves"} <= images
    # The resumed run adds its lines and tells TensorBoard where it resumed.
    steps = {e.step for e in events for v in e.summary.value if v.tag == "loss/total"}
    assert steps == {2, 4}
    assert any(e.HasField("session_log") and e.step == 2 for e in events)  # purge after 2


class FakeWandb(types.ModuleType):
    """Records what spdjax sends to W&B."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        self.util = types.SimpleNamespace(generate_id=lambda: "run123")
        fake = self

        class Run:
            def log(self, data, step):
                fake.calls.append(("log", step, data))

            def finish(self):
                fake.calls.append(("finish",))

        self._run = Run()

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self._run

    def Image(self, path):
        return ("image", pathlib.Path(path).name)


@pytest.mark.slow  # ~27 s; the writer protocol runs in the tensorboard test
def test_wandb_gets_scalars_figures_and_resumes_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run(tms_config(wandb_project="spd"), tmp_path)
    init = fake.calls[0][1]
    assert init["project"] == "spd" and init["id"] == "run123" and init["resume"] == "allow"
    assert init["config"]["steps"] == 20
    logged = [c for c in fake.calls if c[0] == "log"]
    assert [c[1] for c in logged[:2]] == [10, 20] and "loss/total" in logged[0][2]
    assert logged[-1][2]["figures/combined_diagram"] == ("image", "combined_diagram.png")
    assert fake.calls[-1] == ("finish",)
    fake.util.generate_id = lambda: "another"  # a resume keeps the id of the workdir's run
    run(tms_config(wandb_project="spd", steps=30), tmp_path, allow_changes=("steps",))
    assert [c[1]["id"] for c in fake.calls if c[0] == "init"] == ["run123", "run123"]


@pytest.mark.parametrize("overrides, match", [
    ({"tensorboard": True}, r"tensorboard=True asks for tensorboardX, which is not installed: "
                            r"pip install tensorboardX"),
    ({"wandb_project": "spd"}, r"wandb_project='spd' asks for wandb, which is not installed"),
    ({"tensorboard": "yes"},
     r"Config field 'tensorboard': .*cannot be casted to type <class 'bool'>"),
])
def test_writer_settings_fail_early(overrides, match, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # None: import fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=match):
        run(tms_config(**overrides), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()  # before any work
