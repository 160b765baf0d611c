"""A Flax model defined in a test file gets the managed run: checkpoints, kill -9, resume equal to
the uninterrupted run.

The model and its :class:`spdjax.Family` live in this file, nowhere in spdjax, and are not
registered: the runs pass the family as a value. The runs are child processes that import this
module (``PYTHONPATH`` = ``tests/``) and call :func:`train_in_child`; the first is killed with
SIGKILL after its first checkpoint, the second reruns the same call on its workdir (a resume) and
then trains another workdir uninterrupted (in the same process: one import and compile less). The
resumed run must end with the same params and write the same metric lines.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import spdjax

N_IN, N_HIDDEN, N_OUT = 6, 8, 4
STEPS = 100  # 5 checkpoints: the kill lands after the first with 80 steps to spare
SMALL = {"C": 4, "steps": STEPS, "batch_size": 32, "eval_batch_size": 64, "log_every": 10,
         "checkpoint_every": 20, "figures": False}
TESTS = pathlib.Path(__file__).resolve().parent


class SmallMLP(nn.Module):
    """The user's model: two Dense layers (sites "Dense_0", "Dense_1")."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(N_OUT)(nn.gelu(nn.Dense(N_HIDDEN)(x)))


def linen_target(seed: int):
    x = jnp.zeros((1, N_IN))
    model = SmallMLP()
    return spdjax.from_linen(model, model.init(jax.random.key(seed), x), x)


def evaluate(decomposition, params, target_params, cfg, *, steps=None):
    """The family's own metric: how far the summed components are from each weight."""
    out = {}
    for site in decomposition.site_names:
        W = decomposition.target.sites[site].weight(target_params)
        out[site] = float(jnp.linalg.norm(decomposition.component_weight(params, site) - W)
                          / jnp.linalg.norm(W))
    return {"weight_error": out}


FAMILY = spdjax.Family(
    name="own_small_mlp",
    target=lambda cfg: linen_target(0)[0],
    # the target: the model at its init (a model of one's own would load trained params here)
    load_target_params=lambda cfg, seed, cache_dir: linen_target(seed)[1],
    sites=lambda cfg, config: {"Dense_*": config.C},
    sample=lambda cfg, key, batch_size: jax.random.normal(key, (batch_size, N_IN)),
    evaluate=evaluate,
)


def config():
    c = spdjax.config.base_config(FAMILY.name, "default")
    c.update(SMALL)
    return c


def train_in_child(*workdirs: str) -> None:
    """What each child process runs: the managed run of this file's model in each workdir."""
    for workdir in workdirs:
        spdjax.train_and_evaluate(config(), workdir, family=FAMILY)


# ------------------------------------------------------------------------------------ the test

def child(*workdirs: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ)  # the session's target and compilation caches (conftest)
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's script
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    code = f"import test_own_model as m; m.train_in_child(*{[str(w) for w in workdirs]!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=TESTS.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return out


def checkpoints(workdir: pathlib.Path) -> list[int]:
    """The finished checkpoints (numbered step directories; orbax writes to a temporary name
    first)."""
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def metric_lines(workdir: pathlib.Path) -> list[dict]:
    timing = ("wall_time_s", "steps_per_sec")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_own_flax_model_is_killed_and_resumes_to_the_uninterrupted_run(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    p = child(killed)
    deadline = time.time() + 240
    while not checkpoints(killed):
        assert p.poll() is None, p.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    at_kill = checkpoints(killed)
    assert at_kill[-1] < STEPS and not (killed / "summary.json").exists(), (
        "the run finished before it was killed")
    assert (killed / ".lock").exists()  # left behind by the killed process

    out = finish(child(killed, whole))  # the same call again (resumes), then a fresh run
    resumed, fresh = out.split("Summary:", 1)  # the killed workdir's run ends first
    assert "Resuming from the checkpoint at step" in resumed, out
    assert "Resuming" not in fresh, out

    # The same final params, read back from each workdir with the family as a value.
    a = spdjax.load(whole, family=FAMILY)
    b = spdjax.load(killed, family=FAMILY)
    assert a.step == b.step == STEPS
    assert set(a.target.sites) == {"Dense_0", "Dense_1"}
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7),
                 a.params, b.params)

    # The same metric lines, the ones before the kill and the ones after the resume alike.
    lines_a, lines_b = metric_lines(whole), metric_lines(killed)
    assert [r["step"] for r in lines_a] == [r["step"] for r in lines_b] == list(
        range(10, STEPS + 1, 10))
    for x, y in zip(lines_a, lines_b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_allclose(y[key], x[key], rtol=1e-6, err_msg=f"{key} {x['step']}")

    # The family's own evaluation ran in both, with the same result.
    sa = json.loads((whole / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert set(sa["weight_error"]) == {"Dense_0", "Dense_1"}
    for site, value in sa["weight_error"].items():
        np.testing.assert_allclose(sb["weight_error"][site], value, rtol=1e-6)
    np.testing.assert_allclose(sb["loss"]["total"], sa["loss"]["total"], rtol=1e-6)
