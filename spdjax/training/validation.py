"""Every field of a run config checked before any work: :func:`validate`.

Each failure is a ``ValueError`` naming the field, its value and what was expected; the CLI
prints it as one line (exit code 2).
"""

from __future__ import annotations

import math

import jax

from spdjax.core.ci import make_ci_fn
from spdjax.core.components import COMPONENT_INITS
from spdjax.core.decomposition import TIE_MODES
from spdjax.core.sigmoids import SIGMOIDS
from spdjax.methods.base import MethodSpec
from spdjax.training import init_selection, writers
from spdjax.training.family import Family
from spdjax.training.schedules import make_schedule
from spdjax.training.step import MATMUL_PRECISIONS


def _positive_int(config, name: str, minimum: int = 1) -> int:
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _number_in(config, name: str, lo: float, hi: float, *, hi_open: bool = False) -> None:
    value = config[name]
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and lo <= value and (value < hi if hi_open else value <= hi))
    if not ok:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}{')' if hi_open else ']'}, "
                         f"got {value!r}.")


def validate(config, family: Family, method: MethodSpec) -> None:
    """Every field of a run config, before any target is trained or loaded: a ``ValueError``
    naming the field, its value and what was expected. ``family`` checks the variant and
    target-recipe fields, ``method`` its own fields."""
    cfg = family.model_config(config)  # variant and target_recipe fields
    for name in ("steps", "batch_size", "eval_batch_size", "log_every", "checkpoint_every", "C",
                 "microbatches", "eval_microbatches", "mesh_model"):
        _positive_int(config, name)
    for name in ("seed", "target_seed", "target_steps", "faithfulness_warmup_steps"):
        _positive_int(config, name, minimum=0)
    k = _positive_int(config, "steps_per_call")
    for name in ("log_every", "checkpoint_every", "init_select_steps"):
        if config[name] % k:
            raise ValueError(f"{name}={config[name]} is not a multiple of steps_per_call={k}.")
    if config.matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got "
                         f"{config.matmul_precision!r}.")
    for size, chunks in (("batch_size", "microbatches"), ("eval_batch_size", "eval_microbatches")):
        if config[size] % config[chunks]:
            raise ValueError(f"{size}={config[size]} is not divisible by {chunks}="
                             f"{config[chunks]}.")
    if config.mesh_model > jax.device_count() or jax.device_count() % config.mesh_model:
        raise ValueError(f"mesh_model={config.mesh_model} must divide the {jax.device_count()} "
                         "available devices.")
    if not (isinstance(config.lr, (int, float)) and math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"lr must be a finite positive number, got {config.lr!r}.")
    _number_in(config, "lr_warmup_frac", 0.0, 1.0, hi_open=True)
    _number_in(config, "lr_final_frac", 0.0, 1.0)
    _number_in(config, "l0_threshold", 0.0, 1.0)
    _number_in(config, "ci_lower_noise", 0.0, 1.0, hi_open=True)
    _number_in(config, "divergence_factor", 0.0, math.inf)
    for name in ("grad_clip_norm_components", "grad_clip_norm_ci", "faithfulness_warmup_lr",
                 "faithfulness_warmup_weight_decay"):
        _number_in(config, name, 0.0, math.inf)
    make_schedule(config.lr_schedule, config.lr, config.steps)
    make_ci_fn(config.ci_fn, tuple(config.ci_hidden), config.ci_options.to_dict())
    SIGMOIDS.get(config.sigmoid)
    COMPONENT_INITS.get(config.init)
    if config.tie_mode not in TIE_MODES:
        raise ValueError(f"Unknown tie_mode {config.tie_mode!r}; expected one of {TIE_MODES}.")
    if not isinstance(config.get("tie_sites", True), bool):
        raise ValueError(f"tie_sites must be true or false, got {config.tie_sites!r}.")
    writers.check_config(config)
    if config.ensemble_mode not in ("auto", "vmap", "map"):
        raise ValueError(f"ensemble_mode must be 'auto', 'vmap' or 'map', got "
                         f"{config.ensemble_mode!r}.")
    if _positive_int(config, "ensemble") > 1 or config.ensemble_sweep:
        for name, single in (("init_candidates", 1), ("mesh_model", 1)):
            if config[name] != single:
                raise ValueError(f"An ensemble (ensemble={config.ensemble}, ensemble_sweep="
                                 f"{config.ensemble_sweep!r}) trains every member on one device "
                                 f"from its seed's init: {name} must be {single}, got "
                                 f"{config[name]!r}.")
    method.check_config(config, family.target(cfg))  # its own fields (SPD: its loss terms)
    init_selection.check_config(config)
