"""The ResidMLP target cache: trained targets on disk, keyed by variant, steps and seed, and the
one-line report of a cached target (its loss next to the naive baselines).
"""

from __future__ import annotations

import dataclasses
import os

from spdjax.families.resid_mlp import model as rm_model
from spdjax.families.resid_mlp.model import ResidMLPConfig
from spdjax.training import targets as target_training


def cache_stem(cfg: ResidMLPConfig, seed: int, cache_dir: str | os.PathLike) -> str:
    """``cache_dir/resid_mlp_<variant>_<steps>steps_seed<seed>`` (add ``.npz`` / ``.json``)."""
    name = f"resid_mlp_{cfg.variant}_{cfg.steps}steps_seed{seed}"
    return os.path.join(os.fspath(cache_dir), name)


def load_or_train_target(
    variant_or_cfg: str | ResidMLPConfig, seed: int, cache_dir: str | os.PathLike, **train_kwargs
) -> dict:
    """Trained params, from ``cache_dir/resid_mlp_<variant>_<steps>steps_seed<seed>.npz`` if its
    recipe matches.

    Otherwise trains with :func:`~spdjax.families.resid_mlp.model.train_resid_mlp_target` and
    writes the ``.npz`` plus a ``.json`` sidecar (recipe, seed, final and baseline losses,
    training seconds).
    """
    cfg = rm_model.get_resid_config(variant_or_cfg)

    def train_fn():
        params, info = rm_model.train_resid_mlp_target(cfg, seed, **train_kwargs)
        keys = ("final_loss", "baseline_loss", "ideal_baseline_loss", "seconds", "losses")
        return params, {"seed": seed, **{k: info[k] for k in keys}}

    return target_training.load_or_train(cache_stem(cfg, seed, cache_dir),
                                         dataclasses.asdict(cfg), f"ResidMLP {cfg.variant}",
                                         train_fn)


def report(params: dict, cfg: ResidMLPConfig, meta: dict, stem: str) -> str:
    """One line on a cached target: its loss next to the naive baselines."""
    return (f"ResidMLP {cfg.variant} seed {meta['seed']} ({cfg.steps} steps, trained in "
            f"{meta['seconds']:.1f} s): target loss {meta['final_loss']:.3e}; naive monosemantic "
            f"baseline {meta['baseline_loss']:.3e} with the same W_E, "
            f"{meta['ideal_baseline_loss']:.3e} without embedding interference; cached in "
            f"{stem}.npz")
