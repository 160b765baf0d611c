"""Runs by name: :func:`setup`, :func:`train_and_evaluate` and :func:`load` resolve a config's
``experiment`` and ``method`` names in the open registries
(:data:`~spdjax.training.family.FAMILIES`, :data:`~spdjax.methods.METHODS`) and call the run
layer (:mod:`spdjax.training`), which takes values. Pass ``family=`` / ``method=`` to use
values of your own instead of the names.

Open a finished (or running) run's workdir for analysis with :func:`load`:

    run = spdjax.load("workdir/tms_5-2")
    run.config, run.params, run.decomposition, run.target_params
    run.evaluate()          # the experiment's ground-truth metrics, recomputed
    run.plot()              # every figure, redrawn into workdir/figures

Everything comes from the workdir: the config from the checkpoint's metadata (else
``config.json``), the target from ``target_params.npz`` (else the target cache), the params from
the latest checkpoint (or ``step``), matched by name. No optimizer state is read into a template.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections

from spdjax import families  # noqa: F401 (registers the built-in target families)
from spdjax.config import files as configs
from spdjax.config import sweeps
from spdjax.methods import METHODS
from spdjax.methods.base import Method, MethodSpec
from spdjax.training import ensemble as ensemble_lib
from spdjax.training import loop
from spdjax.training.checkpoints import (Checkpointer, CheckpointDamagedError,
                                         CheckpointFormatError)
from spdjax.training.family import FAMILIES, Experiment, Family, build_experiment
from spdjax.training.progress import log_to
from spdjax.training.targets import load_params

log = logging.getLogger("spdjax")


def resolve(config, family: Family | str | None = None,
            method: MethodSpec | str | None = None) -> tuple[Family, MethodSpec]:
    """The family and method of a run: the values given, else those ``config.experiment`` and
    ``config.method`` name (an unknown name is a ``ValueError`` listing the registered ones)."""
    family = FAMILIES.resolve(config.experiment if family is None else family)
    method = METHODS.resolve(config.get("method", "spd") if method is None else method)
    return family, method


def validate(config, family: Family | str | None = None,
             method: MethodSpec | str | None = None) -> None:
    """Every field of ``config`` checked before any work (names resolved as in :func:`setup`):
    a ``ValueError`` naming the field, its value and what was expected."""
    family, method = resolve(config, family, method)
    loop.validate(config, family, method)
    if sweeps.is_ensemble(config):
        sweeps.members(config)


def setup(config, workdir=None, *, family: Family | str | None = None,
          method: MethodSpec | str | None = None, fresh: bool = False,
          allow_changes: tuple[str, ...] = (), target_params: Any = None) -> loop.Run:
    """:func:`spdjax.training.loop.setup` with the family and method named by ``config``
    (unless given); see there."""
    family, method = resolve(config, family, method)
    return loop.setup(config, workdir, family=family, method=method, fresh=fresh,
                      allow_changes=allow_changes, target_params=target_params,
                      upgrade_record=configs.upgrade_record)


def setup_ensemble(config, workdir=None, *, family: Family | str | None = None,
                   method: MethodSpec | str | None = None, fresh: bool = False,
                   allow_changes: tuple[str, ...] = ()) -> ensemble_lib.Ensemble:
    """The ensemble of ``config`` (``ensemble`` seeds x ``ensemble_sweep`` values)."""
    family, method = resolve(config, family, method)
    loop.validate(config, family, method)
    return ensemble_lib.setup(config, sweeps.members(config), workdir, family=family,
                              method=method, fresh=fresh, allow_changes=allow_changes,
                              upgrade_record=configs.upgrade_record)


def train_and_evaluate(config, workdir, *, family: Family | str | None = None,
                       method: MethodSpec | str | None = None, fresh: bool = False,
                       allow_changes: tuple[str, ...] = ()):
    """Trains (or resumes) the run of ``config`` in ``workdir``, evaluates and plots it (what
    the CLI runs): its summary, or every member's for an ensemble config."""
    family, method = resolve(config, family, method)
    if sweeps.is_ensemble(config):  # one program, several runs: a summary each
        loop.validate(config, family, method)
        with log_to():
            return ensemble_lib.train_and_evaluate(
                config, sweeps.members(config), workdir, family=family, method=method,
                fresh=fresh, allow_changes=allow_changes, upgrade_record=configs.upgrade_record)
    return loop.train_and_evaluate(config, workdir, family=family, method=method, fresh=fresh,
                                   allow_changes=allow_changes,
                                   upgrade_record=configs.upgrade_record)


@dataclasses.dataclass(eq=False)
class LoadedRun:
    """A run read back from its workdir."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    experiment: Experiment
    method: Method
    params: Any
    step: int

    @property
    def decomposition(self):
        return self.method.decomposition

    @property
    def target(self):
        return self.experiment.target

    @property
    def target_params(self):
        return self.experiment.target_params

    def evaluate(self) -> dict:
        """The experiment's ground-truth metrics of these params (MMCS/ML2R, CI errors, ...)."""
        return self.experiment.evaluate(self.decomposition, self.params, steps=self.step)

    def plot(self, figures_dir: str | pathlib.Path | None = None) -> list[pathlib.Path]:
        """Redraws every figure (default: into ``workdir/figures``)."""
        return loop.plot(self, figures_dir)


def load(workdir: str | pathlib.Path, *, step: int | None = None, member: str | None = None,
         family: Family | None = None, method: MethodSpec | None = None) -> LoadedRun:
    """Reads the run in ``workdir`` at its latest checkpoint (or ``step``). For an ensemble
    workdir, ``member`` names the member (its directory, e.g. ``"seed_1"``); the result is that
    member as the run it equals (its config, params and directory). ``family`` / ``method``:
    values for a run whose names are not registered (e.g. a model of your own).

    A damaged latest checkpoint is skipped with a warning (the one before is read); a damaged
    ``step`` asked for, or no readable checkpoint at all, is a
    :class:`~spdjax.training.checkpoints.CheckpointDamagedError` naming the steps and why."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{workdir} holds no run: there is no checkpoints/ directory.")
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        steps = [step] if step is not None else list(reversed(ckpt.all_steps()))
        if not steps:
            raise FileNotFoundError(f"{workdir} holds no checkpoint yet.")
        failed = []
        for s in steps:
            try:
                loaded = _load_step(workdir, ckpt, s, member, family, method)
            except CheckpointDamagedError as e:
                failed.append(f"step {s}: {e}")
                continue
            if failed:
                log.warning("%s: skipped damaged checkpoints (%s); loaded step %d.", workdir,
                            "; ".join(failed), s)
            return loaded
    finally:
        ckpt.close()
    raise CheckpointDamagedError(
        f"{workdir} holds no readable checkpoint" + (f" at step {step}" if step is not None
                                                     else "") + f": {'; '.join(failed)}.")


def _damage(step: int, read):
    """``read()``; a failure to read the checkpoint's files is a CheckpointDamagedError."""
    try:
        return read()
    except (CheckpointFormatError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - unreadable: damage
        text = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointDamagedError(f"{type(e).__name__}: {text}") from e


def _load_step(workdir: pathlib.Path, ckpt: Checkpointer, step: int, member, family,
               method) -> LoadedRun:
    meta = _damage(step, lambda: ckpt.read_meta(step))
    if "config" in meta:
        config_dict = meta["config"]
    elif (workdir / "config.json").exists():
        config_dict = json.loads((workdir / "config.json").read_text())
    else:
        raise FileNotFoundError(f"{workdir}: neither the checkpoint nor config.json holds "
                                "the run's config.")
    config = configs.from_dict(config_dict)  # fields newer than the run get defaults
    target_file = workdir / "target_params.npz"
    family, spec = resolve(config, family, method)
    experiment = build_experiment(
        config, family,
        target_params=load_params(target_file) if target_file.exists() else None)
    index = None
    if sweeps.is_ensemble(config):
        config, index, n, workdir = _member(config, workdir, member)
    elif member is not None:
        raise ValueError(f"{workdir} holds one run, not an ensemble: leave member out.")
    method = spec.build(config, experiment, config.lr)
    template = jax.eval_shape(method.init, jax.random.key(0), experiment.target_params)
    if index is None:
        params = _damage(step, lambda: ckpt.restore_subtree(template, "params", meta["step"]))
    else:  # the ensemble's params are stacked along a leading member axis
        stacked = jax.tree.map(lambda t: jax.ShapeDtypeStruct((n,) + t.shape, t.dtype),
                               template)
        params = jax.tree.map(lambda x: x[index], _damage(
            step, lambda: ckpt.restore_subtree(stacked, "params", meta["step"])))
    return LoadedRun(workdir=workdir, config=config, experiment=experiment, method=method,
                     params=params, step=int(meta["step"]))


def _member(config, workdir: pathlib.Path, member: str | None):
    """``(member config, index, number of members, member directory)`` of ``member`` in an
    ensemble workdir."""
    members = sweeps.members(config)
    labels = [m.label for m in members]
    if member not in labels:
        raise ValueError(f"{workdir} holds an ensemble of {len(labels)} runs: pass member= one "
                         f"of {labels}" + ("" if member is None else f" (got {member!r})") + ".")
    i = labels.index(member)
    return members[i].config, i, len(members), workdir / member
