"""Open a finished (or running) run's workdir for analysis: :func:`load`.

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
import pathlib
from typing import Any

import jax
import ml_collections

from spdjax import configs
from spdjax.experiments.registry import Experiment, build_experiment
from spdjax.experiments.target_training import load_params
from spdjax.methods import METHODS, Method
from spdjax.training.checkpoints import Checkpointer


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
        from spdjax.training.loop import plot

        return plot(self, figures_dir)


def load(workdir: str | pathlib.Path, *, step: int | None = None,
         member: str | None = None) -> LoadedRun:
    """Reads the run in ``workdir`` at its latest checkpoint (or ``step``). For an ensemble
    workdir, ``member`` names the member (its directory, e.g. ``"seed_1"``); the result is that
    member as the run it equals (its config, params and directory)."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{workdir} holds no run: there is no checkpoints/ directory.")
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        meta = ckpt.read_meta(step)
        if "config" in meta:
            config_dict = meta["config"]
        elif (workdir / "config.json").exists():
            config_dict = json.loads((workdir / "config.json").read_text())
        else:
            raise FileNotFoundError(f"{workdir}: neither the checkpoint nor config.json holds "
                                    "the run's config.")
        config = configs.from_dict(config_dict)  # fields newer than the run get defaults
        target_file = workdir / "target_params.npz"
        experiment = build_experiment(
            config, target_params=load_params(target_file) if target_file.exists() else None)
        index = None
        if config.get("ensemble", 1) > 1 or config.get("ensemble_sweep", ""):
            config, index, n, workdir = _member(config, workdir, member)
        elif member is not None:
            raise ValueError(f"{workdir} holds one run, not an ensemble: leave member out.")
        method = METHODS.get(config.get("method", "spd"))(config, experiment, config.lr)
        template = jax.eval_shape(method.init, jax.random.key(0), experiment.target_params)
        if index is None:
            params = ckpt.restore_subtree(template, "params", meta["step"])
        else:  # the ensemble's params are stacked along a leading member axis
            stacked = jax.tree.map(lambda t: jax.ShapeDtypeStruct((n,) + t.shape, t.dtype),
                                   template)
            params = jax.tree.map(lambda x: x[index],
                                  ckpt.restore_subtree(stacked, "params", meta["step"]))
    finally:
        ckpt.close()
    return LoadedRun(workdir=workdir, config=config, experiment=experiment, method=method,
                     params=params, step=int(meta["step"]))


def _member(config, workdir: pathlib.Path, member: str | None):
    """``(member config, index, number of members, member directory)`` of ``member`` in an
    ensemble workdir."""
    from spdjax.training import ensemble

    key, values = ensemble.parse_sweep(config)
    members = [ensemble.Member(config.seed + i, v) for v in (values or [None])
               for i in range(config.ensemble)]
    labels = [m.label(key) for m in members]
    if member not in labels:
        raise ValueError(f"{workdir} holds an ensemble of {len(labels)} runs: pass member= one "
                         f"of {labels}" + ("" if member is None else f" (got {member!r})") + ".")
    i = labels.index(member)
    return ensemble.member_config(config, members[i]), i, len(members), workdir / member
