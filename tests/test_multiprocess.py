"""Two processes as one run (jax.distributed over localhost, gloo on CPU), as on two hosts: the
CLI trains, checkpoints, resumes and evaluates; process 0 alone writes the workdir's files; the
metric lines equal the same run made in one process."""

import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import spdjax
from spdjax.config import files as configs
from spdjax.training.progress import log_to

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config=configs/tms.py", "--config.steps=40", "--config.batch_size=256",
        "--config.eval_batch_size=512", "--config.log_every=10", "--config.checkpoint_every=20",
        "--config.figures=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cli(workdir, devices: int, extra=(), **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1", **env_extra)
    return subprocess.Popen([sys.executable, "-m", "spdjax.main", f"--workdir={workdir}", *ARGS,
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def two_processes(workdir, extra=()):
    port = free_port()
    procs = [cli(workdir, 2, extra, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                 JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # ~70-140 s (four 2-process CLI runs); sharding itself: training/test_step.py
def test_two_processes_train_resume_and_write_once(tmp_path):
    two_processes(tmp_path / "two", ["--config.steps=20"])  # stops at 20 ...
    outs = two_processes(tmp_path / "two", ["--allow_config_change=steps"])  # ... resumes to 40
    assert "Resuming from the checkpoint at step 20" in outs[0]
    # the same run in this one process (8 devices): 20 steps, then resumed to 40
    config = configs.load("tms:5-2", {"batch_size": 256, "eval_batch_size": 512, "log_every": 10,
                                      "checkpoint_every": 20, "figures": False, "steps": 20})
    with log_to(io.StringIO()):
        spdjax.train_and_evaluate(config, tmp_path / "one")
        config.steps = 40
        spdjax.train_and_evaluate(config, tmp_path / "one", allow_changes=("steps",))
    two, one = rows(tmp_path / "two" / "metrics.jsonl"), rows(tmp_path / "one" / "metrics.jsonl")
    assert [r["step"] for r in two] == [10, 20, 30, 40] == [r["step"] for r in one]
    for a, b in zip(two, one):
        np.testing.assert_allclose(a["loss/total"], b["loss/total"], rtol=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 40
    np.testing.assert_allclose(
        summary["mmcs"], json.loads((tmp_path / "one" / "summary.json").read_text())["mmcs"],
        rtol=1e-4)


def test_an_incomplete_multiprocess_environment_is_an_error(tmp_path):
    p = cli(tmp_path, 1, JAX_COORDINATOR_ADDRESS="localhost:1", JAX_NUM_PROCESSES="2")
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 2 and "JAX_PROCESS_ID not set" in out
