"""The transformer target cache: trained targets on disk, keyed by variant (or a hash of a
changed recipe), steps and seed, with their quality on the evaluation batch; and the one-line
report of a cached target.

A module of its own because it needs both :mod:`~spdjax.families.lm.model` (the recipe) and
:mod:`~spdjax.families.lm.evaluation` (the trained target's quality), which imports model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np

from spdjax.families.lm import evaluation
from spdjax.families.lm import model as lm_model
from spdjax.families.lm.model import LMConfig
from spdjax.training import targets as target_training


def cache_stem(cfg: LMConfig, seed: int, cache_dir) -> str:
    """``lm_<variant>_<steps>steps_seed<s>``; a changed recipe is ``lm_custom-<hash>_...``."""
    name = next((k for k, v in lm_model.VARIANTS.items() if v == cfg), None)
    if name is None:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
        name = f"custom-{digest.hexdigest()[:8]}"
    return os.path.join(os.fspath(cache_dir), f"lm_{name}_{cfg.steps}steps_seed{seed}")


def load_or_train_target(cfg: LMConfig, seed: int, cache_dir) -> dict:
    """The trained target params for ``cfg`` and ``seed`` (cached, recipe-checked)."""
    def train():
        params, info = target_training.train(lm_model.make_trainer, cfg, cfg.steps, seed,
                                             what=f"LM {cfg.data}", chunk_steps=500)
        meta = {"seconds": info["seconds"], "final_loss": info["final_loss"],
                "losses": info["losses"],
                **evaluation.target_quality(params, cfg, info["eval_key"])}
        return params, meta

    return target_training.load_or_train(
        cache_stem(cfg, seed, cache_dir), dataclasses.asdict(cfg), f"LM {cfg.data}", train)


def report(params: dict, cfg: LMConfig, meta: dict, stem: str) -> str:
    """One line on a cached target: its size, training time and loss, and its quality on the
    evaluation batch."""
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    quality = ", ".join(f"{k} {v:.4g}" for k, v in meta.items()
                        if k.startswith("target_") and isinstance(v, float))
    return (f"LM target {cfg.data} ({n} params) cached at {stem}.npz: trained "
            f"{meta['seconds']:.0f} s, final training loss {meta['final_loss']:.4g}; {quality}.")
