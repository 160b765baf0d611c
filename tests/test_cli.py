"""The CLI end to end on a fresh workdir, config mismatch refusal, and kill-and-resume."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import cli_env

from spdjax.config import files as configs
from spdjax.config.runs import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--config.batch_size=256", "--config.eval_batch_size=2000", "--config.log_every=50",
         "--config.checkpoint_every=100"]


@pytest.fixture(scope="module")
def env():
    e = cli_env()  # one CPU device, the session's target cache (conftest)
    return e


def cli(workdir, *extra, env):
    cmd = [sys.executable, "-m", "spdjax.main", "--config=configs/tms.py", f"--workdir={workdir}",
           *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(workdir, *extra, env):
    p = cli(workdir, *extra, env=env)
    out, _ = p.communicate(timeout=600)
    return p.returncode, out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, env):
    wd = tmp_path_factory.mktemp("full")
    rc, out = run(wd, "--config.steps=600", env=env)
    assert rc == 0, out
    return wd, out


def test_cli_writes_every_output(full_run):
    wd, out = full_run
    assert "Compiling the train step" in out and "steps/s" in out and "ETA" in out
    config = json.loads((wd / "config.json").read_text())
    assert config["steps"] == 600 and config["variant"] == "5-2"
    lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(50, 601, 50))
    for key in ("loss/total", "loss/faithfulness", "loss/stochastic_recon",
                "loss/stochastic_recon_layerwise", "loss/importance_minimality", "lr",
                "ci_l0/linear1", "ci_l0/linear2", "steps_per_sec"):
        assert key in lines[-1], key
    summary = json.loads((wd / "summary.json").read_text())
    for key in ("mmcs", "ml2r", "mmcs_std", "ml2r_std", "ci_l0", "alive", "steps", "wall_time_s",
                "loss", "ci_errors", "ci_dense_peaks"):
        assert key in summary, key
    assert "stochastic_recon" in summary["loss"] and "total" in summary["loss"]
    assert set(summary["ci_l0"]) == set(summary["alive"]) == {"linear1", "linear2"}
    assert not any("/" in key for key in summary)  # nested, not metrics.jsonl's flat keys
    assert summary["ci_dense_peaks"] == {}  # 5-2 has no identity site
    assert summary["steps"] == 600 and summary["mmcs"] > 0.9
    figs = {p.name for p in (wd / "figures").glob("*.png")}
    assert {"target.png", "combined_diagram.png", "ci_lower_leaky.png"} <= figs
    assert (wd / "checkpoints" / "600").exists()


def test_changed_config_is_refused(full_run, env):
    wd, _ = full_run
    rc, out = run(wd, "--config.steps=600", "--config.lr=0.5", env=env)
    assert rc != 0 and "different config" in out and "lr: 0.001 -> 0.5" in out


# ~45 s; resuming to the identical run is tested by test_faults.py's ctrl-c test and
# test_own_model.py
@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(full_run, tmp_path, env):
    wd_full, _ = full_run
    wd = tmp_path / "killed"
    p = cli(wd, "--config.steps=600", env=env)
    deadline = time.time() + 300
    while not (wd / "checkpoints" / "300").exists():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (wd / "summary.json").exists(), "the run finished before it was killed"
    assert (wd / ".lock").exists()  # left by the killed process; must not block the resume
    rc, out = run(wd, "--config.steps=600", env=env)
    assert rc == 0, out
    assert "Resuming from the checkpoint at step" in out
    a = json.loads((wd_full / "summary.json").read_text())
    b = json.loads((wd / "summary.json").read_text())
    for key in ("mmcs", "ml2r"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=key)
    for key in ("total", "stochastic_recon"):
        np.testing.assert_allclose(b["loss"][key], a["loss"][key], rtol=1e-6, err_msg=key)
    full_lines = (wd_full / "metrics.jsonl").read_text().splitlines()
    res_lines = (wd / "metrics.jsonl").read_text().splitlines()
    assert len(res_lines) == len(full_lines)
    for x, y in zip(full_lines, res_lines):
        x, y = json.loads(x), json.loads(y)
        np.testing.assert_allclose(y["loss/total"], x["loss/total"], rtol=1e-6)


def test_bad_config_values_fail_early(tmp_path, env):
    rc, out = run(tmp_path / "bad", "--config.steps=10",
                  "--config.losses.stochastic_recon.sampling=gauss", env=env)
    assert rc != 0 and "Unknown mask sampling 'gauss'" in out
    assert not (tmp_path / "bad").exists()  # refused before the run began
    # Another bad value takes the same path (the config's check before any work, as above): in
    # this process, without a second CLI start-up.
    with pytest.raises(ValueError, match="Unknown lr schedule 'cosin'"):
        validate(configs.load("tms:5-2", {"steps": 10, "lr_schedule": "cosin"}))
