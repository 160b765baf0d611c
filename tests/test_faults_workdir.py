"""Workdir faults, round three (issue 36, item 1 and some of item 7): a config change of the
state's shapes is refused before any file is touched, ``--fresh`` moves the old run aside, a
resume refuses a target other than its checkpoints', a workdir with no usable checkpoint stops
instead of restarting, and misused workdirs and runs are one clear error."""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import spdjax
from helpers import finish
from spdjax.training import loop, workdir as wd_lib
from spdjax.training import targets as target_training
from spdjax.training.checkpoints import Checkpointer, CheckpointDamagedError
from spdjax.training.workdir import ConfigMismatchError, JsonlWriter, UnusableWorkdirError

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The shapes of tests/test_faults_divergence.py's runs: one compilation (XLA's persistent cache)
SMALL = {"steps": 30, "C": 6, "batch_size": 64, "eval_batch_size": 512, "log_every": 5,
         "checkpoint_every": 10, "figures": False}


def small(spec="tms:5-2", **overrides):
    return spdjax.config.load(spec, {**SMALL, **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 30-step run (checkpoints 20 and 30 kept) to copy."""
    wd = tmp_path_factory.mktemp("finished") / "run"
    finish(small(), wd)
    return wd


@pytest.fixture
def copy(finished, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(finished, wd)
    return wd


def snapshot(workdir: pathlib.Path) -> dict:
    """Every file of a workdir (but the lock) by relative path -> bytes."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _truncate_arrays(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:16])


def _garble_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{not json")


def _cli(*args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "spdjax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ config changes of shapes

@pytest.mark.parametrize("override, field", [({"C": 4}, "C"), ({"ci_hidden": (8,)}, "ci_hidden"),
                                             ({"ci_fn": "vector_mlp"}, "ci_fn"),
                                             ({"target_seed": 1}, "target_seed")])
def test_a_shape_change_is_refused_up_front_even_when_allowed(copy, override, field):
    before = snapshot(copy)
    with pytest.raises(ConfigMismatchError, match=rf"{field}: .*--fresh") as err:
        spdjax.setup(small(**override), copy, allow_changes=(field,))
    assert "another --workdir" in str(err.value) and "\n" not in str(err.value)
    assert snapshot(copy) == before  # config.json, checkpoints, metric lines, history as they were
    assert not (copy / "damaged").exists()
    run = spdjax.setup(small(), copy)  # the original command still resumes
    loop.close(run)
    assert run.step == 30


def test_a_shape_change_no_field_list_knows_is_refused_by_the_checkpoint_shapes(
        copy, monkeypatch):
    """The backstop: the shapes in the newest checkpoint against the new state's; a checkpoint
    that does not fit is not damage."""
    monkeypatch.setattr(wd_lib, "STRUCTURAL", ())
    before = snapshot(copy)
    with pytest.raises(ConfigMismatchError, match=r"do not fit this config .*shapes.*--fresh"):
        spdjax.setup(small(C=4), copy, allow_changes=("C",))
    assert snapshot(copy) == before and not (copy / "damaged").exists()


def test_a_variant_change_is_refused_up_front_and_the_original_command_still_resumes(copy):
    before = snapshot(copy)
    with pytest.raises(ConfigMismatchError, match=r"variant: '5-2' -> '5-2-id'.*--fresh"):
        spdjax.setup(small("tms:5-2-id"), copy, allow_changes=("variant",))
    assert snapshot(copy) == before
    run = spdjax.setup(small(), copy)
    loop.close(run)
    assert run.step == 30


def test_an_ensemble_size_change_is_refused_up_front(tmp_path):
    wd = tmp_path / "ens"
    spdjax.train_and_evaluate(small(ensemble=2, steps=10), wd)
    before = snapshot(wd)
    with pytest.raises(ConfigMismatchError, match=r"ensemble: 2 -> 3.*--fresh"):
        spdjax.train_and_evaluate(small(ensemble=3, steps=10), wd, allow_changes=("ensemble",))
    assert snapshot(wd) == before and not (wd / "damaged").exists()
    ens = spdjax.setup_ensemble(small(ensemble=3, steps=10), wd, fresh=True)
    spdjax.training.ensemble.close(ens)
    (aside,) = [p for p in wd.iterdir() if p.name.startswith("old_")]
    assert snapshot(aside) == before  # the members' directories too
    assert ens.step == 0 and sorted(p.name for p in wd.iterdir() if p.name.startswith("seed")) \
        == ["seed_0", "seed_1", "seed_2"]


def test_a_shape_change_on_the_command_line_is_one_line_with_exit_code_2(finished, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(finished, wd)
    before = snapshot(wd)
    p = _cli("--config=configs/tms.py:5-2", f"--workdir={wd}", "--config.C=4",
             "--allow_config_change=C")
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--fresh" in p.stderr and "Traceback" not in p.stdout + p.stderr
    assert snapshot(wd) == before


# ---------------------------------------------------------------------------------- --fresh

def test_fresh_moves_the_old_run_aside_and_deletes_nothing(copy, caplog):
    old = snapshot(copy)
    with caplog.at_level(logging.WARNING, logger="spdjax"):
        run = spdjax.setup(small(C=4), copy, fresh=True)
    loop.close(run)
    assert run.step == 0
    aside = [p for p in copy.iterdir() if p.name.startswith("old_")]
    assert len(aside) == 1
    assert any("--fresh: moved" in r.message and str(aside[0]) in r.message
               for r in caplog.records)
    moved = snapshot(aside[0])
    assert {k: v for k, v in old.items()} == moved  # every file of the old run, unchanged
    assert json.loads((copy / "config.json").read_text())["C"] == 4
    assert not any((copy / "checkpoints").glob("[0-9]*"))


# ---------------------------------------------------------------------------------- target

def test_a_resume_refuses_a_target_other_than_its_checkpoints(copy):
    saved = target_training.load_params(copy / "target_params.npz")
    assert "target_sha256" in Checkpointer(copy / "checkpoints").read_meta()
    (copy / "target_params.npz").write_bytes(b"PK\x03\x04 damaged")
    other = jax.tree.map(lambda x: x * 1.5, saved)
    before = snapshot(copy)
    with pytest.raises(UnusableWorkdirError,
                       match=r"another target.*target_params.npz.*--fresh") as err:
        spdjax.setup(small(), copy, target_params=other)
    assert "target_params.npz is damaged" in str(err.value)
    assert snapshot(copy) == before
    # the cache's target is the checkpoints' one: the run resumes and rewrites the file
    run = spdjax.setup(small(), copy)
    loop.close(run)
    assert run.step == 30
    jax.tree.map(np.testing.assert_array_equal,
                 target_training.load_params(copy / "target_params.npz"), saved)


def test_a_damaged_workdir_target_is_not_replaced_by_another_cached_one(copy, tmp_path,
                                                                        monkeypatch):
    """The issue's case: the workdir's target_params.npz is damaged and the target cache holds
    another target (a different one under the same recipe)."""
    cache = tmp_path / "cache" / "targets"
    shutil.copytree(pathlib.Path(os.environ["SPDJAX_CACHE"]) / "targets", cache)
    for npz in cache.glob("tms_5-2_seed0.npz"):
        params = target_training.load_params(npz)
        target_training.save_params(npz, jax.tree.map(lambda x: x * 1.5, params))
    monkeypatch.setenv("SPDJAX_CACHE", str(tmp_path / "cache"))
    (copy / "target_params.npz").write_bytes(b"")
    before = snapshot(copy)
    with pytest.raises(UnusableWorkdirError,
                       match=r"another target .* from the target cache .*cache.*, as "
                             r".*target_params.npz is damaged\); put back"):
        spdjax.setup(small(), copy)
    assert snapshot(copy) == before


# ---------------------------------------------------------------------- no usable checkpoint

def test_when_every_checkpoint_is_damaged_the_run_stops_instead_of_restarting(copy):
    for step in (20, 30):
        _truncate_arrays(copy / "checkpoints" / str(step))
    before = snapshot(copy)
    with pytest.raises(UnusableWorkdirError, match=r"Every checkpoint .*step 30.*step 20.*--fresh"):
        spdjax.setup(small(), copy)
    assert snapshot(copy) == before and not (copy / "damaged").exists()


def test_every_checkpoint_damaged_on_the_command_line_is_one_line_no_traceback(finished,
                                                                              tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(finished, wd)
    for step in (20, 30):
        _truncate_arrays(wd / "checkpoints" / str(step))
    p = _cli("--config=configs/tms.py:5-2", f"--workdir={wd}",
             *[f"--config.{k}={v}" for k, v in SMALL.items()])
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: Every checkpoint") and len(p.stderr.splitlines()) == 1
    assert "Traceback" not in p.stdout + p.stderr and "Event loop" not in p.stdout + p.stderr


def test_metric_lines_are_set_aside_never_deleted(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = JsonlWriter(path)
    for s in (5, 10, 15):
        w.write_scalars(s, {"loss": s})
    w.close()
    JsonlWriter(path, resume_step=10).close()  # a resume at 10
    JsonlWriter(path).close()  # a start over in the same file
    aside = tmp_path / "metrics_after_last_checkpoint.jsonl"
    assert [json.loads(l)["step"] for l in aside.read_text().splitlines()] == [15, 5, 10]
    assert path.read_text() == ""


# ------------------------------------------------------------------------------ item 7 bits

def test_load_skips_a_damaged_newest_checkpoint_with_a_warning(copy, caplog):
    _garble_meta(copy / "checkpoints" / "30")
    with caplog.at_level(logging.WARNING, logger="spdjax"):
        loaded = spdjax.load(copy)
    assert loaded.step == 20
    assert any("skipped damaged checkpoints" in r.message and "step 30" in r.message
               for r in caplog.records)
    with pytest.raises(CheckpointDamagedError, match=r"no readable checkpoint at step 30"):
        spdjax.load(copy, step=30)
    _truncate_arrays(copy / "checkpoints" / "20")
    with pytest.raises(CheckpointDamagedError, match=r"no readable checkpoint: step 30.*step 20"):
        spdjax.load(copy)


def test_train_after_close_is_refused(tmp_path):
    run = spdjax.setup(small(steps=20), tmp_path / "run")
    loop.close(run)
    with pytest.raises(RuntimeError, match="run is closed"):
        loop.train(run)


def test_a_workdir_that_is_a_file_or_a_summary_that_is_a_directory_is_one_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"is a file, not a directory"):
        spdjax.setup(small(), tmp_path / "file")
    with pytest.raises(ValueError, match=r"is a file, not a directory"):
        spdjax.setup(small(), tmp_path / "file" / "below")
    (tmp_path / "run" / "summary.json").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"summary.json is a directory"):
        spdjax.setup(small(), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["summary.json"]
    p = _cli("--config=configs/tms.py:5-2", f"--workdir={tmp_path / 'file'}")
    assert p.returncode == 2 and p.stderr.startswith("error: "), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "is a file" in p.stderr, p.stderr


def test_a_checkpoint_of_a_newer_format_is_not_called_a_config_change(copy):
    for step in (20, 30):
        path = copy / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(path.read_text())
        path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(UnusableWorkdirError, match=r"format 99, newer than .*upgrade spdjax"):
        spdjax.setup(small(), copy)
    assert not (copy / "damaged").exists()
