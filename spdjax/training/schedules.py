"""Learning-rate schedules by name, as ``optax`` schedules ``step -> lr``.

With ``i = step - warmup`` of ``n = steps - warmup`` post-warm-up steps, ``t = i / (n - 1)``
runs from 0 at the first to 1 at the last update step:
  ``constant``     lr
  ``linear``       lr * (f + (1 - f) * (1 - i / n))        (paper-era: 1 - t/T, lr/n at the end)
  ``linear_head``  lr * (f + (1 - f) * (1 - t))            (later reference: exactly f at the end)
  ``cosine``       lr * cos(pi/2 * t)                    (paper: quarter period, 0 at the end)
  ``cosine_half``  lr * (f + (1 - f) * (1 + cos(pi t)) / 2)   (later reference)
with ``f = final_frac``; a linear warm-up from 0 over ``int(steps * warmup_frac)`` steps.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp

from spdjax.core.registry import Registry


# Each shape maps (i, n, f) -> the lr factor: step i in [0, n) of the n post-warm-up steps.
def _t(i, n):
    return jnp.clip(i / max(n - 1, 1), 0.0, 1.0)


def _constant(i, n, f):
    return jnp.ones_like(i)


def _linear_paper(i, n, f):
    return f + (1.0 - f) * (1.0 - jnp.clip(i / n, 0.0, 1.0))


def _linear_head(i, n, f):
    return f + (1.0 - f) * (1.0 - _t(i, n))


def _cosine_quarter(i, n, f):
    return jnp.cos(0.5 * math.pi * _t(i, n))


def _cosine_half(i, n, f):
    return f + (1.0 - f) * 0.5 * (1.0 + jnp.cos(math.pi * _t(i, n)))


SCHEDULES: Registry[Callable] = Registry("lr schedule", {
    "constant": _constant,
    "linear": _linear_paper,
    "linear_head": _linear_head,
    "cosine": _cosine_quarter,
    "cosine_half": _cosine_half,
})


def make_schedule(
    name: str, lr: float, total_steps: int, *, warmup_frac: float = 0.0, final_frac: float = 0.0
) -> Callable:
    """An optax-compatible schedule. ``final_frac`` applies to ``linear[_head]`` and
    ``cosine_half``."""
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}.")
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    shape = SCHEDULES.get(name)
    warmup = int(total_steps * warmup_frac)
    decay_steps = total_steps - warmup

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        value = lr * shape(jnp.maximum(step - warmup, 0.0), decay_steps, final_frac)
        if warmup > 0:
            value = jnp.where(step < warmup, lr * step / warmup, value)
        return value

    return schedule
