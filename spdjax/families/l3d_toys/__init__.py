"""The L3D paper's toy models as a family (``config.experiment = "l3d_toys"``): TMS 5-2, the
circuit-superposition model TMCS 10 -> 5 -> 10, its higher-rank version 30 -> 10 -> 30 (inputs
in groups of 5 that are active together) and the X^2 GELU MLP, with the reference's data (no
all-zero samples).

* :mod:`~spdjax.families.l3d_toys.model`: models, data, target recipe;
* :mod:`~spdjax.families.l3d_toys.evaluation`: output purity, TMS MMCS, TMCS ``A`` recovery,
  higher-rank group recovery.

Every site is decomposed (``{"*": C}``). The TMS target's ``linear2`` is ``linear1ᵀ``, but the
family declares no ties (its TMCS and X^2 variants have none): SPD or APD decompose the two
usages as separate sites here; L3D takes each usage as its own tensor anyway.
"""

from __future__ import annotations

import dataclasses
import os

from spdjax.families.l3d_toys import evaluation, model
from spdjax.training import targets as target_training
from spdjax.training.family import Family, register


def cache_stem(cfg: model.ToyConfig, seed: int, cache_dir) -> str:
    """``cache_dir/l3d_<variant>_seed<seed>`` (a changed recipe adds its fields)."""
    default = model.VARIANTS[cfg.variant]
    recipe = "".join(f"_{f.name}{getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                     if getattr(cfg, f.name) != getattr(default, f.name))
    return os.path.join(os.fspath(cache_dir), f"l3d_{cfg.variant}{recipe}_seed{seed}")


def load_or_train_target(cfg: model.ToyConfig, seed: int, cache_dir) -> dict:
    """The cached target of ``cfg`` and ``seed``, trained on a miss."""
    def train_fn():
        params, info = model.train_target(cfg, seed)
        return params, {"final_loss": info["final_loss"], "seconds": info["seconds"]}

    return target_training.load_or_train(cache_stem(cfg, seed, cache_dir),
                                         dataclasses.asdict(cfg), f"L3D toy {cfg.variant}",
                                         train_fn)


def report(params, cfg: model.ToyConfig, meta: dict, stem: str) -> str:
    return (f"L3D toy {cfg.variant}: final training loss {meta['final_loss']:.3e} "
            f"({meta['seconds']:.0f} s); {stem}.npz")


FAMILY = register(Family(
    name="l3d_toys",
    title="L3D toy models",
    variants=model.VARIANTS,
    default_variant="tmcs",
    target=model.toy_target,
    load_target_params=load_or_train_target,
    sites=model.sites,
    sample=model.sample_batch,
    evaluate=evaluation.evaluate,
    cache_stem=cache_stem,
    report=report,
))

__all__ = ["FAMILY", "evaluation", "model"]
