"""Fault injection: nothing lost, nothing silent, with real files and real processes.

Damaged checkpoints, metric files, target caches and configs; a second process on a workdir; a
killed or interrupted run; diverging and exploding losses; bad input at the CLI and at the
library boundary; evaluation settings changed after training; a finished run extended.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from helpers import cli_cases, finish, shared_train_steps
from spdjax.training import targets as target_training
from spdjax.families.tms import cache as tms_cache
from spdjax.families.tms import evaluation as tms_evaluation
from spdjax.families.tms import model as tms
from spdjax.training import loop
from spdjax.training.checkpoints import Checkpointer
from spdjax.training.workdir import ConfigMismatchError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {"steps": 30, "C": 6, "batch_size": 64, "eval_batch_size": 256, "log_every": 5,
         "checkpoint_every": 10, "figures": False}


def small(**overrides):
    return spdjax.config.load("tms:5-2", {**SMALL, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_step_per_config():
    """Runs of one config (every field) share one compiled train step (helpers.py)."""
    with shared_train_steps():
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_step_per_config):
    """A finished 30-step run (checkpoints 20 and 30 kept) to copy and damage."""
    wd = tmp_path_factory.mktemp("finished") / "run"
    finish(small(), wd)
    return wd


@pytest.fixture
def copy(finished, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(finished, wd)
    return wd


# ------------------------------------------------------------------------------ damaged files

def _truncate_arrays(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:16])


def _garble_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{not json")


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.parametrize("damage", [_truncate_arrays, _garble_meta, _empty])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_used(copy, damage,
                                                                                caplog):
    damage(copy / "checkpoints" / "30")
    with caplog.at_level(logging.WARNING, logger="spdjax"):
        run = spdjax.setup(small(), copy)
    assert run.step == 20
    assert any("Checkpoint" in r.message and "damaged" in r.message for r in caplog.records)
    assert [p.name.split("_")[0] for p in (copy / "damaged").iterdir()] == ["30"]
    assert [json.loads(l)["step"] for l in (copy / "metrics.jsonl").read_text().splitlines()] \
        == [5, 10, 15, 20]  # the metric lines agree with the checkpoint resumed
    assert not (copy / "summary.json").exists()  # it described step 30
    loop.train(run)
    loop.close(run)
    assert Checkpointer(copy / "checkpoints").all_steps() == [20, 30]


def test_a_truncated_metrics_line_is_dropped_on_resume(copy, caplog):
    text = (copy / "metrics.jsonl").read_text()
    (copy / "metrics.jsonl").write_text(text + '{"step": 35, "loss/to')
    shutil.rmtree(copy / "checkpoints" / "30")  # resume at 20, rewrite the file
    with caplog.at_level(logging.WARNING, logger="spdjax"):
        run = spdjax.setup(small(), copy)
    loop.close(run)
    assert any("damaged" in r.message and "metrics.jsonl" in r.message for r in caplog.records)
    rows = [json.loads(l) for l in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]


@pytest.mark.parametrize("content", ["", "{garbage", None])
def test_an_empty_or_missing_config_json_is_repaired_from_the_checkpoint(copy, content, caplog):
    path = copy / "config.json"
    path.unlink() if content is None else path.write_text(content)
    with pytest.raises(ConfigMismatchError, match=r"lr: 0.001 -> 0.5"):  # still refuses changes
        spdjax.setup(small(lr=0.5), copy)
    with caplog.at_level(logging.WARNING, logger="spdjax"):
        run = spdjax.setup(small(), copy)
    loop.close(run)
    assert run.step == 30
    assert json.loads(path.read_text())["lr"] == 0.001
    assert any("config.json is missing or unreadable" in r.message for r in caplog.records)


def test_a_damaged_target_cache_file_is_retrained(tmp_path, caplog):
    cfg = tms.TMSConfig(5, 2, steps=20, batch_size=64)
    first = tms_cache.load_or_train_target(cfg, 0, tmp_path, max_tries=1, tol=10.0)
    stem = tms_cache.cache_stem(cfg, 0, tmp_path)
    for suffix, garbage in ((".npz", b"PK\x03\x04 truncated"), (".json", b"{oops")):
        pathlib.Path(stem + suffix).write_bytes(garbage)
        with caplog.at_level(logging.WARNING, logger="spdjax"):
            again = tms_cache.load_or_train_target(cfg, 0, tmp_path, max_tries=1, tol=10.0)
        assert any("damaged" in r.message for r in caplog.records)
        caplog.clear()
        jax.tree.map(np.testing.assert_array_equal, again, first)
        assert target_training.load(stem, target_training.read_meta(stem)["recipe"], "x")


# -------------------------------------------------------------------------- divergence

def test_a_diverging_run_stops_keeps_only_good_checkpoints_and_resumes_on_purpose(tmp_path):
    wd = tmp_path / "run"
    # lr 3 reached over a warm-up: the first steps train (the checkpoints it keeps are a state a
    # smaller lr recovers from), then the run blows up (at step 40 here)
    config = small(lr=3.0, lr_warmup_frac=0.3, C=20, batch_size=256, steps=300, log_every=10,
                   checkpoint_every=20)
    with pytest.raises(loop.DivergenceError, match=r"diverged at step \d+: .*loss/") as err:
        finish(config, wd)
    assert "--allow_config_change=lr" in str(err.value)
    ckpt = Checkpointer(wd / "checkpoints")
    steps = ckpt.all_steps()
    assert steps, "a good checkpoint before the divergence is kept"
    logged = [json.loads(l)["step"] for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == steps[-1]  # the record agrees with the checkpoint; the rest set aside
    # the good rows logged after that checkpoint are set aside (none when the divergence was the
    # first log step after it; where it falls moves with the last bits of the numerics)
    diverged = int(re.search(r"diverged at step (\d+)", str(err.value)).group(1))
    aside = wd / "metrics_after_last_checkpoint.jsonl"
    after = ([json.loads(l)["step"] for l in aside.read_text().splitlines()]
             if aside.exists() else [])
    assert after == list(range(steps[-1] + 10, diverged, 10))
    for step in steps:
        params = ckpt.restore_arrays(step)["params"]
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    ckpt.close()
    with pytest.raises(ConfigMismatchError, match="--allow_config_change=lr"):
        spdjax.setup(small(lr=1e-3, lr_warmup_frac=0.3, C=20, batch_size=256, steps=300,
                         log_every=10, checkpoint_every=20), wd)
    run = spdjax.setup(small(lr=1e-3, lr_warmup_frac=0.3, C=20, batch_size=256, steps=300,
                           log_every=10, checkpoint_every=20), wd, allow_changes=("lr",))
    assert run.step == steps[-1]
    loop.train(run, run.step + 20)  # trains on from the good checkpoint with the smaller lr
    loop.close(run)
    history = [json.loads(l) for l in (wd / "history.jsonl").read_text().splitlines()]
    assert history[-1]["config_changes"] == [["lr", 3.0, 1e-3]]


def test_a_finite_but_exploding_loss_stops_before_it_is_saved(tmp_path):
    run = spdjax.setup(small(), tmp_path / "run")  # step 30 is its last: checked before saved
    step_fn = run.step_fn

    def exploding(state, target_params, key, hparams):  # the loss goes to 1e20x after step 25
        state, metrics = step_fn(state, target_params, key, hparams)
        scale = jnp.where(state.step > 25, 1e20, 1.0)
        return state, {**metrics, "loss": {k: v * scale for k, v in metrics["loss"].items()}}

    run.step_fn = exploding
    with pytest.raises(loop.DivergenceError, match=r"step 30: loss/total .* the run's lowest"):
        loop.train(run)
    loop.close(run)
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [10, 20]


# ------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("override, message", [
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"lr": float("nan")}, "lr must be a finite positive number"),
    ({"batch_size": 64, "microbatches": 3}, "not divisible by microbatches=3"),
    ({"mesh_model": 3}, "mesh_model=3 must divide"),
    ({"eval_batch_size": 100, "eval_microbatches": 3}, "eval_batch_size=100 is not divisible"),
    ({"lr_warmup_frac": 1.5}, r"lr_warmup_frac must be a number in \[0.0, 1.0\)"),
    ({"losses.importance_minimality.pnorm": 0.0}, "pnorm must be a finite number > 0"),
    ({"losses.stochastic_recon.n_samples": 0}, "n_samples must be an integer >= 1"),
    ({"ci_fn": "gate"}, "Unknown CI function type 'gate'"),
    ({"tie_mode": "alias"}, "Unknown tie_mode 'alias'"),
])
def test_every_config_field_is_validated_before_any_work(override, message):
    with pytest.raises(ValueError, match=message):
        spdjax.config.runs.validate(small(**override))


def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path):
    cases = ((["--config.stepz=3"], "unknown config field: stepz"),  # flag parsing
             (["--config.losses.foo.coeff=1"], "unknown config field: foo"),
             (["--config.steps=0"], "steps must be an integer >= 1"))  # the run's validation
    argvs = [["--config=configs/tms.py", f"--workdir={tmp_path / 'x'}", *extra]
             for extra, _ in cases]
    # one child process; steps=0 ends it (os._exit(2), as a run's errors do): its code is the
    # process's
    p, results = cli_cases("spdjax.main", "spdjax", argvs, cwd=ROOT, timeout=120)
    codes, errs = [code for code, _, _ in results], [err for _, _, err in results]
    assert codes == [2, 2, None] and p.returncode == 2, (codes, p.returncode, p.stderr)
    for (_, expected), err in zip(cases, errs):
        assert err.strip() == err.strip().splitlines()[0]  # one line
        assert err.startswith("error: ") and expected in err, err


def test_library_inputs_are_checked_at_the_boundary():
    import flax.linen as nn

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(7, name="out")(nn.Embed(7, 4, name="embed")(ids))

    model = LM()
    ids = jnp.zeros((1, 3), jnp.int32)
    target, tparams = spdjax.from_linen(model, model.init(jax.random.key(0), ids), ids)
    decomp = spdjax.decompose(target, {"*": 4})
    params = decomp.init(jax.random.key(1), tparams)
    ctx = lambda batch, p=params: spdjax.make_context(decomp, tparams, p, batch)  # noqa: E731
    ctx(jnp.array([[1, 2, 6]]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 7\); got ids from 1 to 9"):
        ctx(jnp.array([[1, 2, 9]]))
    with pytest.raises(ValueError, match="empty input"):
        ctx(jnp.zeros((0, 3), jnp.int32))
    # (its one site's factors have the shapes of this one's: the init reuses compiled ops)
    other = spdjax.decompose(target, {"out": 4}).init(jax.random.key(2), tparams)
    with pytest.raises(ValueError, match="built for another decomposition"):
        ctx(jnp.array([[1, 2, 6]]), other)
    mlp_target, mlp_params = __import__("helpers").two_site_target()
    d = spdjax.decompose(mlp_target, {"*": 4})
    with pytest.raises(ValueError, match="NaN or inf"):
        spdjax.make_context(d, mlp_params, d.init(jax.random.key(0), mlp_params),
                            jnp.array([[1.0, jnp.nan, 0.0]]))


def test_a_short_run_is_not_told_to_try_another_seed():
    summary = {"subcomponents_above_norm": {"linear1": 6, "linear2": 5},
               "ci_errors": {"total": 3, "loose_total": 2}}
    cfg = tms.get_tms_config("5-2")
    short = tms_evaluation.solution_warnings(summary, cfg, steps=300)
    assert "fewer than the paper's 40000" in short[-1]
    assert not any("another --config.seed" in n for n in short)
    full = tms_evaluation.solution_warnings(summary, cfg, steps=40_000)
    assert "try another --config.seed" in full[-1]


# ---------------------------------------------------------------------------- evaluation

def test_evaluation_settings_change_on_a_finished_run_without_retraining(copy):
    before = json.loads((copy / "summary.json").read_text())
    summary, step = finish(small(eval_batch_size=512, eval_microbatches=4), copy)
    assert step == 30 and summary["steps"] == 30
    assert summary["mmcs"] == before["mmcs"]  # same params: no training happened
    assert set(summary["alive"]) == {"linear1", "linear2"}
    assert json.loads((copy / "config.json").read_text())["eval_microbatches"] == 4


def test_microbatched_evaluation_agrees_with_one_chunk(finished):
    run = spdjax.load(finished)
    batch = run.experiment.eval_batch_fn(jax.random.key(3))
    one = run.method.evaluate(run.params, run.target_params, batch, jax.random.key(4))
    # two chunks of 128 rows: the chunk program of the evaluation-settings test's 512 in 4
    two = run.method.evaluate(run.params, run.target_params, batch, jax.random.key(4),
                              microbatches=2)
    assert two["alive"] == one["alive"]
    for site in one["ci_l0"]:  # CI does not depend on masks: the chunked mean is the mean
        np.testing.assert_allclose(two["ci_l0"][site], one["ci_l0"][site], rtol=1e-5)
    np.testing.assert_allclose(two["loss"]["faithfulness"], one["loss"]["faithfulness"],
                               rtol=1e-5)


def test_a_failed_evaluation_keeps_the_trained_run(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise MemoryError("out of memory (simulated)")

    monkeypatch.setattr(spdjax.training.family.Experiment, "evaluate", broken)
    with pytest.raises(loop.EvaluationError, match="Training finished and is saved"):
        spdjax.train_and_evaluate(small(), tmp_path / "run")
    monkeypatch.undo()
    assert Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == 30
    summary, step = finish(small(), tmp_path / "run")  # evaluates, no training
    assert step == 30 and "mmcs" in summary


def test_a_finished_run_is_extended_on_purpose(copy):
    with pytest.raises(ConfigMismatchError, match="steps: 30 -> 40"):
        spdjax.setup(small(steps=40), copy)
    summary, step = finish(small(steps=40), copy, allow_changes=("steps",))
    assert step == 40 and summary["steps"] == 40
    steps = [json.loads(l)["step"] for l in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint_and_resumes_identically(finished,
                                                                                   tmp_path):
    wd = tmp_path / "run"
    run = spdjax.setup(small(), wd)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when launched in the background with &

    def ctrl_c(step, _):
        if step == 13:  # between checkpoints (every 10)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        loop.train(run, on_step=ctrl_c)
    loop.close(run)
    assert Checkpointer(wd / "checkpoints").all_steps() == [10, 13]  # no step lost
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    run = spdjax.setup(small(), wd)
    loop.train(run)
    loop.close(run)
    assert run.step == 30
    resumed = Checkpointer(wd / "checkpoints").restore_arrays(30)["params"]
    straight = Checkpointer(finished / "checkpoints").restore_arrays(30)["params"]
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)


def test_a_second_ctrl_c_interrupts_at_once(tmp_path):
    run = spdjax.setup(small(), tmp_path / "run")

    def ctrl_c_twice(step, _):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        loop.train(run, on_step=ctrl_c_twice)
    loop.close(run)
    assert not Checkpointer(tmp_path / "run" / "checkpoints").all_steps()  # stopped in step 3


# ------------------------------------------------------------------ processes on a workdir

@pytest.mark.slow  # ~35-70 s; a killed CLI run resuming is in the default suite (test_cli.py)
def test_second_process_interrupt_and_resume_with_real_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONUNBUFFERED"] = "1"
    wd = tmp_path / "run"
    args = [sys.executable, "-m", "spdjax.main", "--config=configs/tms.py", f"--workdir={wd}",
            "--config.steps=100000", "--config.batch_size=64", "--config.log_every=100",
            "--config.checkpoint_every=200", "--config.eval_batch_size=256"]
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (wd / "checkpoints" / "200").exists():
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    t0 = time.time()
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "in use by another spdjax process" in second.stderr, (
        second.stdout + second.stderr)
    assert time.time() - t0 < 60  # refused at once, not after a target or compile
    first.send_signal(signal.SIGINT)  # Ctrl-C, quite likely during an asynchronous save
    out, err = first.communicate(timeout=60)
    assert first.returncode == 130, out + err
    assert "Traceback" not in err and "Traceback" not in out, out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted; rerun the same command"), err
    assert "Interrupt received: stopping after this step's checkpoint" in out + err
    # (A lock left by a SIGKILLed process: tests/test_cli.py resumes such a run.)
    latest = max(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    config = spdjax.config.load("tms:5-2", {"steps": latest + 50, "batch_size": 64,
                                             "log_every": 100, "checkpoint_every": 200,
                                             "eval_batch_size": 256})
    run = spdjax.setup(config, wd, allow_changes=("steps",))  # the interrupted run resumes
    assert run.step == latest and not (wd / "damaged").exists()  # no save was cut short
    loop.train(run)
    loop.close(run)
    assert Checkpointer(wd / "checkpoints").latest_step() == latest + 50
