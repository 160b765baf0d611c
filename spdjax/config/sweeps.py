"""Ensembles from a config: ``config.ensemble`` seeds and ``config.ensemble_sweep`` values become
the :class:`~spdjax.training.ensemble.Member` values the run layer trains as one program.

``--config.ensemble=N`` makes the members seeds ``seed .. seed + N - 1``;
``--config.ensemble_sweep="losses.importance_minimality.coeff=1e-3,3e-3,1e-2"`` makes them every
(value, seed) pair, value-major. A member's config is the single run it equals: its seed, the
swept value, ``ensemble = 1`` and no sweep.
"""

from __future__ import annotations

from spdjax.training.ensemble import Member


def is_ensemble(config) -> bool:
    """Whether ``config`` asks for more than one member."""
    return config.get("ensemble", 1) > 1 or bool(config.get("ensemble_sweep", ""))


def parse_sweep(config) -> tuple[str, list[float]]:
    """``("dotted.key", [values])`` of ``config.ensemble_sweep`` (``("", [])`` if none); a
    clear error for a malformed sweep, an unknown key or a non-numeric field."""
    text = config.ensemble_sweep
    if not text:
        return "", []
    key, eq, values = text.partition("=")
    try:
        parsed = [float(v) for v in values.split(",")] if eq and values else []
    except ValueError:
        parsed = []
    if not parsed:
        raise ValueError(f"ensemble_sweep must be 'dotted.key=v1,v2,...' with numbers, got "
                         f"{text!r}.")
    node = config
    for part in key.split("."):
        if part not in node:
            raise ValueError(f"ensemble_sweep: the config has no field {key!r}.")
        node = node[part]
    if not isinstance(node, float):
        raise ValueError(f"ensemble_sweep: {key!r} is {node!r}; only float fields (loss "
                         "coefficients, lr, ...) can be swept, as every member must have the "
                         "same shapes.")
    return key, parsed


def member_config(config, seed: int, key: str = "", value: float | None = None):
    """The config of the single run a member equals."""
    c = config.copy_and_resolve_references()
    c.seed, c.ensemble, c.ensemble_sweep = seed, 1, ""
    if key:
        *parents, leaf = key.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[leaf] = float(value)
    return c


def members(config) -> list[Member]:
    """Every member of ``config``'s ensemble (a one-member list for a single run's config)."""
    key, values = parse_sweep(config)
    out = []
    for value in values or [None]:
        for i in range(config.ensemble):
            seed = config.seed + i
            label = f"seed_{seed}" if value is None else f"seed_{seed}_{key}={value:g}"
            out.append(Member(label, seed, member_config(config, seed, key, value)))
    return out
