"""Fault injection, round three: SIGTERM and signals during the shutdown, the command line's
environment (config file, TensorBoard folder, full disk, multi-process variables, target cache
folder, LM corpus size) and progress output of the long phases.

Cases about processes and signals run real CLI processes; a full disk is simulated inside the
child process (its checkpointer's save raises ``ENOSPC``), never made real.
"""

import dataclasses
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import cli_env

import spdjax
from spdjax.cli import main as cli_main
from spdjax.families.lm import data as lm_data
from spdjax.families.lm import model as lm_model
from spdjax.training import distributed, interrupts, progress, targets, writers
from spdjax.training.checkpoints import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config.batch_size=64", "--config.C=6", "--config.eval_batch_size=512",
        "--config.figures=False"]


@pytest.fixture(scope="module")
def env():
    e = cli_env()  # one CPU device, the session's target cache (conftest)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "SPDJAX_DISTRIBUTED"):
        e.pop(name, None)
    return e


def cli_args(workdir, *extra):
    return ["--config=configs/tms.py", f"--workdir={workdir}", *TINY, *extra]


def run_cli(workdir, *extra, env, prelude="", timeout=180):
    """The CLI in a child process; ``prelude`` is Python run in it first (to inject a fault)."""
    code = (f"import os, signal, sys\n{prelude}\nfrom spdjax.cli import main\n"
            f"sys.argv = ['spdjax'] + {cli_args(workdir, *extra)!r}\nmain.run()\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error_line(p, code, *expected):
    assert p.returncode == code, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), p.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------ SIGTERM

def test_sigterm_checkpoints_the_current_step_and_exits_143(tmp_path, env):
    wd = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "spdjax.main",
                          *cli_args(wd, "--config.steps=100000", "--config.log_every=100",
                                    "--config.checkpoint_every=200")],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 150
    while not (wd / "checkpoints" / "200").exists():
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # what a scheduler or `docker stop` sends
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, out + err
    assert "Traceback" not in out + err, out + err
    assert "SIGTERM received: stopping after this step's checkpoint" in out + err
    assert err.strip().splitlines()[-1].startswith("error: terminated (SIGTERM); rerun the same "
                                                   "command to resume"), err
    steps = Checkpointer(wd / "checkpoints").all_steps()
    assert steps and steps[-1] > 200  # the step it stopped at was saved ...
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == [str(s) for s in steps]
    assert not (wd / "damaged").exists()  # ... completely: nothing half written


_SIGNAL_IN_WAIT = """
import os, signal
from spdjax.training.checkpoints import Checkpointer
_wait, _sent = Checkpointer.wait, []
def wait(self):
    if len(_sent) < len(SIGNALS):
        _sent.append(1)
        os.kill(os.getpid(), SIGNALS[len(_sent) - 1])
    return _wait(self)
Checkpointer.wait = wait
"""


def test_ctrl_c_during_the_final_checkpoint_ends_with_one_line(tmp_path, env):
    wd = tmp_path / "run"
    p = run_cli(wd, "--config.steps=20", "--config.checkpoint_every=10", env=env,
                prelude="SIGNALS = [signal.SIGINT]\n" + _SIGNAL_IN_WAIT)
    assert_one_error_line(p, 130, "interrupted; rerun the same command to resume")
    assert Checkpointer(wd / "checkpoints").latest_step() == 20  # the final save completed


def test_a_second_signal_during_the_shutdown_exits_quietly(tmp_path, env):
    wd = tmp_path / "run"
    p = run_cli(wd, "--config.steps=20", "--config.checkpoint_every=10", env=env,
                prelude="SIGNALS = [signal.SIGTERM, signal.SIGINT]\n" + _SIGNAL_IN_WAIT)
    assert_one_error_line(p, 143, "SIGINT during the shutdown: stopped at once",
                          "rerun the same command to resume")


def test_stop_request_handles_sigterm_and_restores_both_handlers():
    before = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    interrupts.reset()
    with interrupts.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert {s: signal.getsignal(s) for s in interrupts.SIGNALS} == before
    assert interrupts.received() == signal.SIGTERM and interrupts.exit_code(signal.SIGTERM) == 143
    interrupts.reset()
    assert interrupts.received() is None and interrupts.exit_code(None) == 130


def test_outside_training_the_first_signal_interrupts_and_is_remembered():
    before = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    interrupts.reset()
    seconds = []
    with interrupts.ShutdownGuard(lambda first, sig: seconds.append(sig)):
        with pytest.raises(KeyboardInterrupt):  # e.g. SIGTERM while the target trains
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
    assert interrupts.received() == signal.SIGTERM and not seconds  # a second one would exit
    assert {s: signal.getsignal(s) for s in interrupts.SIGNALS} == before
    interrupts.reset()


# -------------------------------------------------------------------- one line, before any work

@pytest.mark.slow  # 4 CLI processes (~50 s); test_faults.py's user errors cover the one-line path
def test_cli_environment_errors_are_one_line_before_any_work(tmp_path, env):
    (tmp_path / "file").write_text("not a folder")
    tb_run = tmp_path / "tb_run"
    (tb_run / "tensorboard").parent.mkdir()
    (tb_run / "tensorboard").write_text("a file where the event folder goes")
    cases = [
        (["--config=configs/nope.py"], {}, "config file configs/nope.py not found"),
        (["--config.tensorboard=True"], {"workdir": tb_run},
         "TensorBoard folder"),
        ([f"--config.target_cache_dir={tmp_path / 'file' / 'sub'}"], {},
         f"is below {tmp_path / 'file'}, which is a file"),
        ([], {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "two",
              "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be the number of processes"),
    ]
    for extra, more, expected in cases:
        wd = more.pop("workdir", tmp_path / "run")
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "spdjax.main", *cli_args(wd), *extra],
                           cwd=ROOT, env={**env, **more}, capture_output=True, text=True,
                           timeout=120)
        assert_one_error_line(p, 2, expected)
        assert "Training the" not in p.stdout and "Compiling" not in p.stdout, p.stdout
        assert time.time() - t0 < 60
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_tensorboard_folder_that_is_a_file_or_read_only_is_refused(tmp_path, monkeypatch):
    class Config(dict):
        tensorboard = True

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tensorboard").write_text("")
    with pytest.raises(ValueError, match="tensorboard is a file, not a folder"):
        writers.check_dirs(Config(), tmp_path / "a")
    ro = tmp_path / "b" / "tensorboard"
    ro.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(os, "access",  # chmod does not bind root: read-only as the OS says it
                        lambda p, mode: False if pathlib.Path(p) == ro else real_access(p, mode))
    with pytest.raises(ValueError, match="not writable"):
        writers.check_dirs(Config(), tmp_path / "b")
    with pytest.raises(ValueError, match="not writable"):
        writers.make_writer(Config(), tmp_path / "b", None)
    writers.check_dirs(Config(), tmp_path / "c")  # absent: created later
    Config.tensorboard = False
    writers.check_dirs(Config(), tmp_path / "a")  # off: not checked


def test_a_full_disk_during_a_checkpoint_write_is_one_line_naming_the_workdir(tmp_path, env):
    wd = tmp_path / "run"
    # Every file the checkpoint library opens for writing under checkpoints/ fails as on a full
    # disk: the errors arise in its background threads, as they would.
    prelude = f"""
import builtins, errno, io
_open = builtins.open
def full_disk_open(file, mode="r", *args, **kwargs):
    if any(m in mode for m in "wax") and {str(wd / "checkpoints")!r} in str(file):
        raise OSError(errno.ENOSPC, "No space left on device", str(file))
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = full_disk_open
"""
    p = run_cli(wd, "--config.steps=20", "--config.checkpoint_every=10", env=env,
                prelude=prelude)
    line = assert_one_error_line(p, 2, f"no space left on the disk of {wd}", "free some space")
    assert "the disk mounted at" in line
    p = run_cli(wd, "--config.steps=20", "--config.checkpoint_every=10", env=env)  # space again
    assert p.returncode == 0, p.stdout + p.stderr
    assert Checkpointer(wd / "checkpoints").all_steps() == [10, 20]


def test_full_disk_errors_are_recognised_through_wrapping():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as e:
            raise RuntimeError("async save failed") from e
    except RuntimeError as e:
        assert cli_main.disk_full(e)
    assert cli_main.disk_full(ValueError("write failed: No space left on device"))
    assert not cli_main.disk_full(OSError(13, "Permission denied"))


def test_asyncio_reports_of_abandoned_reads_are_held_until_an_unnamed_error(capsys):
    """A failed restore can leave orbax's read tasks unretrieved; asyncio reports each one at
    garbage collection. The CLI holds those (they are not the error) and prints them only when
    it meets an error it cannot name."""
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(handler)
    try:
        held = cli_main._HeldCheckpointErrors().install()
        asyncio_log.error("Task exception was never retrieved")
        asyncio_log.warning("slow callback")  # not an error: passes through
        assert [r.getMessage() for r in seen] == ["slow callback"]
        held.release()
        assert [r.getMessage() for r in seen] == ["slow callback",
                                                  "Task exception was never retrieved"]
        asyncio_log.error("after release")  # no longer held
        assert seen[-1].getMessage() == "after release"
    finally:
        asyncio_log.removeHandler(handler)


def test_the_multiprocess_environment_is_parsed_with_clear_messages():
    ok = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
          "JAX_PROCESS_ID": "1"}
    assert distributed.settings(ok) == ("10.0.0.1:1234", 2, 1)
    assert distributed.settings({}) is None
    for name, value, message in (
            ("JAX_NUM_PROCESSES", "two", "JAX_NUM_PROCESSES must be the number of processes, an "
                                         "integer >= 1, got 'two'"),
            ("JAX_NUM_PROCESSES", "0", "got '0'"),
            ("JAX_PROCESS_ID", "2", r"JAX_PROCESS_ID must be this process's index, an integer in "
                                    r"\[0, 1\]"),
            ("JAX_PROCESS_ID", "-1", "got '-1'"),
            ("JAX_COORDINATOR_ADDRESS", "10.0.0.1", "must be host:port")):
        with pytest.raises(ValueError, match=message):
            distributed.settings({**ok, name: value})
    line = distributed.waiting_line("10.0.0.1:1234", 2, 0, 300)
    assert "waiting for all 2 processes to connect" in line and "10.0.0.1:1234" in line


def test_process_0_without_its_peer_says_it_waits_then_stops_with_one_line(tmp_path, env):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    more = {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": "0", "SPDJAX_CONNECT_TIMEOUT": "2"}
    p = subprocess.run([sys.executable, "-m", "spdjax.main", *cli_args(tmp_path / "run")],
                       cwd=ROOT, env={**env, **more}, capture_output=True, text=True, timeout=120)
    assert "waiting for all 2 processes to connect (up to 2 s)" in p.stdout, p.stdout + p.stderr
    assert_one_error_line(p, 2, "did not all connect", f"localhost:{port}")


# ------------------------------------------------------------------------ targets and corpora

def test_a_target_cache_below_a_file_is_refused_before_training(tmp_path, caplog):
    (tmp_path / "file").write_text("")
    stem = str(tmp_path / "file" / "sub" / "t")
    trained = []
    with pytest.raises(ValueError, match="which is a file, not a directory"):
        targets.load_or_train(stem, {"a": 1}, "toy", lambda: trained.append(1))
    assert not trained
    with pytest.raises(ValueError, match="is a file, not a directory"):
        targets.check_cache_dir(tmp_path / "file")
    targets.check_cache_dir(tmp_path / "new" / "dir", create=True)
    assert (tmp_path / "new" / "dir").is_dir()


def _toy_trainer(stop_at=None):
    """A toy target trained with Adam (state to restore); its evaluation after each chunk stops
    the training at step ``stop_at`` as a Ctrl-C would."""
    seen = []

    def evaluate(t, f):
        seen.append(1)
        if stop_at is not None and len(seen) * 10 == stop_at:
            raise KeyboardInterrupt
        return {"w0": t["w"][0]}

    def make_trainer(recipe):
        return targets.TargetTrainer(
            init=lambda key: ({"w": jax.random.normal(key, (3,))}, {"b": jnp.ones(3)}),
            loss=lambda t, f, batch: jnp.sum((t["w"] - batch - f["b"]) ** 2),
            sample=lambda key: jax.random.normal(key, (3,)),
            optimizer=optax.adam(0.05), evaluate=evaluate)
    return make_trainer


def test_an_interrupted_target_training_resumes_to_the_uninterrupted_target(tmp_path, monkeypatch,
                                                                            caplog):
    monkeypatch.setattr(targets, "PARTIAL_EVERY_S", 0.0)  # keep progress after every chunk

    def train(stop_at=None):
        def train_fn():
            params, info = targets.train(_toy_trainer(stop_at), "toy", 40, 0, what="Toy",
                                         chunk_steps=10)
            return params, {"losses": info["losses"], "evals": info["evals"]}
        return train_fn

    whole = targets.load_or_train(str(tmp_path / "whole"), {"a": 1}, "Toy", train())
    assert not list(tmp_path.glob("whole.partial*"))  # nothing kept once the cache is written

    stem = str(tmp_path / "t")
    with pytest.raises(KeyboardInterrupt):
        targets.load_or_train(stem, {"a": 1}, "Toy", train(stop_at=30))
    assert json.loads(pathlib.Path(stem + ".partial_seed0.json").read_text())["done"] == 20
    with caplog.at_level(logging.INFO, logger="spdjax"):
        resumed = targets.load_or_train(stem, {"a": 1}, "Toy", train())
    assert any("Resuming the Toy target (seed 0) at step 20 of 40" in r.getMessage()
               for r in caplog.records)
    jax.tree.map(np.testing.assert_array_equal, resumed, whole)  # bit for bit
    meta, whole_meta = targets.read_meta(stem), targets.read_meta(str(tmp_path / "whole"))
    assert meta["losses"] == whole_meta["losses"] and len(meta["evals"]) == 4
    assert not list(tmp_path.glob("t.partial*"))

    # another recipe's or a damaged partial file is said and ignored: the training starts over
    for recipe, damage in (({"a": 2}, None), ({"a": 1}, b"PK garbage")):
        caplog.clear()
        stem = str(tmp_path / f"u{recipe['a']}")
        with pytest.raises(KeyboardInterrupt):
            targets.load_or_train(stem, {"a": 1}, "Toy", train(stop_at=30))
        if damage:
            pathlib.Path(stem + ".partial_seed0.npz").write_bytes(damage)
        with caplog.at_level(logging.INFO, logger="spdjax"):
            again = targets.load_or_train(stem, recipe, "Toy", train())
        said = " ".join(r.getMessage() for r in caplog.records)
        assert ("damaged" if damage else "another training's") in said, said
        assert "Resuming" not in said
        jax.tree.map(np.testing.assert_array_equal, again, whole)


def test_an_empty_lm_corpus_is_refused_before_target_training():
    base = lm_model.VARIANTS["bytes"]
    for bad in (0, -5, 100, 2.5e6):
        with pytest.raises(ValueError, match="corpus_bytes must be an integer >= "):
            dataclasses.replace(base, corpus_bytes=bad)
    low = lm_data.min_corpus_bytes(base.seq_len)
    assert min(lm_data.split_sizes(low)) >= base.seq_len > min(lm_data.split_sizes(low - 1))
    dataclasses.replace(base, corpus_bytes=low)
    with pytest.raises(ValueError, match="corpus_bytes must be an integer"):
        spdjax.config.runs.validate(spdjax.config.load("lm:bytes",
                                                       {"target_recipe": {"corpus_bytes": 0}}))


# ------------------------------------------------------------------------------------ progress

def test_target_training_reports_progress_per_chunk(caplog):
    def make_trainer(recipe):
        return targets.TargetTrainer(
            init=lambda key: ({"w": jnp.zeros(3)}, {}),
            loss=lambda t, f, batch: jnp.sum((t["w"] - batch) ** 2),
            sample=lambda key: jax.random.normal(key, (3,)),
            optimizer=optax.sgd(0.1))

    with caplog.at_level(logging.INFO, logger="spdjax"):
        targets.train(make_trainer, "toy", 30, 0, what="Toy", chunk_steps=10)
    lines = [r.getMessage() for r in caplog.records if "Toy target (seed 0)" in r.getMessage()]
    assert len(lines) == 3 and "step 30/30" in lines[-1] and "ETA" in lines[-1], lines


def test_evaluation_announcement():
    assert progress.evaluation_line(2000) == "Evaluating on 2000 examples..."
    assert progress.evaluation_line(2000, 4) == "Evaluating on 2000 examples in 4 chunks..."
    assert progress.format_bytes(512) == "512 B" and progress.format_bytes(2.5e9) == "2.5 GB"


def test_the_target_and_plot_commands_end_with_one_error_line(tmp_path, env):
    (tmp_path / "file").write_text("")
    for module, args, expected in (
            ("spdjax.cli.target", ["--family=tms", f"--cache-dir={tmp_path / 'file' / 'sub'}"],
             "which is a file, not a directory"),
            ("spdjax.cli.plot", [f"--workdir={tmp_path / 'none'}"], "holds no run")):
        p = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert_one_error_line(p, 2, expected)
