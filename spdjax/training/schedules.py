"""Learning-rate schedules by name, as ``optax`` schedules ``step -> lr``.

``t = (step - warmup) / (decay_steps - 1)`` runs from 0 to 1 over the post-warm-up steps:
  ``constant``     lr
  ``linear``       lr * (f + (1 - f) * (1 - t))
  ``cosine``       lr * cos(pi/2 * t)                    (paper: quarter period, 0 at the end)
  ``cosine_half``  lr * (f + (1 - f) * (1 + cos(pi t)) / 2)   (later reference)
with ``f = final_frac``; a linear warm-up from 0 over ``int(steps * warmup_frac)`` steps.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

from spdjax.registry import Registry


def _constant(t, f):
    return jnp.ones_like(t)


def _linear(t, f):
    return f + (1.0 - f) * (1.0 - t)


def _cosine_quarter(t, f):
    return jnp.cos(0.5 * math.pi * t)


def _cosine_half(t, f):
    return f + (1.0 - f) * 0.5 * (1.0 + jnp.cos(math.pi * t))


SCHEDULES: Registry[Callable] = Registry("lr schedule", {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine_quarter,
    "cosine_half": _cosine_half,
})


def make_schedule(
    name: str, lr: float, total_steps: int, *, warmup_frac: float = 0.0, final_frac: float = 0.0
) -> Callable:
    """An optax-compatible schedule. ``final_frac`` applies to ``linear`` and ``cosine_half``."""
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}.")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    shape = SCHEDULES.get(name)
    warmup = int(total_steps * warmup_frac)
    decay_steps = total_steps - warmup

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip((step - warmup) / max(decay_steps - 1, 1), 0.0, 1.0)
        value = lr * shape(t, final_frac)
        if warmup > 0:
            value = jnp.where(step < warmup, lr * step / warmup, value)
        return value

    return schedule
