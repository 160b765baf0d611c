"""The TMS target cache: trained targets on disk, keyed by variant, recipe and seed, and the
one-line report (with the feature-direction figure) of a cached target.

A module of its own because it needs both :mod:`~spdjax.families.tms.model` (the recipe) and
:mod:`~spdjax.families.tms.plots` (the report's figure), and plots imports model.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from spdjax.families.tms import plots
from spdjax.families.tms import model as tms_model
from spdjax.families.tms.model import TMS_VARIANTS, TMSConfig
from spdjax.training import targets as target_training


def load_or_train_target(
    cfg_name_or_cfg: str | TMSConfig, seed: int, cache_dir: str | os.PathLike, **train_kwargs
) -> dict:
    """Trained TMS params, from ``cache_dir/tms_<variant>_seed<seed>.npz`` if its recipe matches.

    Otherwise trains with :func:`~spdjax.families.tms.model.train_checked_target` and writes the
    ``.npz`` plus a ``.json`` sidecar (recipe, seed actually used, final loss, feature report).
    """
    cfg = tms_model.get_tms_config(cfg_name_or_cfg)

    def train_fn():
        params, info = tms_model.train_checked_target(cfg, seed, **train_kwargs)
        meta = {"requested_seed": seed, "trained_seed": info["seed"]}
        meta.update({k: info[k] for k in ("tried_seeds", "final_loss", "feature_report",
                                          "seconds")})
        return params, meta

    return target_training.load_or_train(cache_stem(cfg, seed, cache_dir),
                                         dataclasses.asdict(cfg), f"TMS {cfg.variant}", train_fn)


def cache_stem(cfg: TMSConfig, seed: int, cache_dir: str | os.PathLike) -> str:
    """``cache_dir/tms_<variant>[_single-update][_<field><value>...]_seed<seed>`` (add ``.npz`` /
    ``.json``): a recipe changed from its variant's names the changed fields, so that it does not
    overwrite the variant's cached target."""
    recipe = "" if cfg.double_update else "_single-update"
    default = TMS_VARIANTS.get(cfg.variant)
    if default is not None:
        recipe += "".join(f"_{f.name}{getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                          if f.name != "double_update"
                          and getattr(cfg, f.name) != getattr(default, f.name))
    return os.path.join(os.fspath(cache_dir), f"tms_{cfg.variant}{recipe}_seed{seed}")


def report(params: dict, cfg: TMSConfig, meta: dict, stem: str) -> str:
    """One line on a cached target, and its feature directions drawn next to the cache file."""
    read_back = np.round(tms_model.feature_report(params, cfg).astype(np.float64), 3).tolist()
    path = plots.plot_tms_vectors(np.asarray(params["linear1"]["kernel"]), stem + ".png",
                                  title=f"TMS {cfg.variant} target")
    return (f"TMS {cfg.variant}: trained seed {meta['trained_seed']} (tried "
            f"{meta['tried_seeds']}), loss {meta['final_loss']:.3e}; one-hot 0.75 read-back per "
            f"feature: {read_back}\nSaved {stem}.npz and {path}")
