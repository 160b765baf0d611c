"""Optimizers by name, for one parameter group at a time (components, CI functions, adversary).

A config names an optimizer per group (``"adam"``, ``"adamw"``, ``"sgd"``, ``"muon"``) with its
learning rate and options; :func:`make` turns that into an ``optax.GradientTransformation``.
:data:`OPTIMIZERS` is an open registry: register a factory ``(learning_rate, **options) ->
GradientTransformation`` of your own and name it in a config.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; optax's
``optax.contrib.muon``) orthogonalises the momentum of each 2-D parameter with Newton-Schulz
iterations and updates every other parameter (biases, vectors) with Adam, as the VPD recipe uses
it for the components and the CI function ("Interpreting Language Model Parameters", Bushnaq et
al. 2026, training recipe). Which leaves are matrices is decided by name, not rank
(:func:`muon_dims`): the factors ``V`` (d_in, C) and ``U`` (C, d_out) are each one matrix, a CI
function's weights ``w`` are matrices over their last two axes with any leading axis (the
per-component MLPs' C) a batch axis, and everything else (biases ``b``, which the per-component
MLPs store as (C, width), 2-D) goes to Adam, where optax's own rule (every 2-D leaf) would
orthogonalise those biases.

:func:`groups_from_config` turns a run config's ``optimizer`` section (one ``{name, lr, options}``
per group) into one transformation per group; :func:`by_group` applies them to ``params[group]``
each, with its own state.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax
import optax

from spdjax.core.registry import Registry

OptimizerFactory = Callable[..., optax.GradientTransformation]


# Leaves that are weight matrices (last path key): the factors and the CI functions' weights.
MATRIX_KEYS = ("V", "U", "w")
_MATRIX = optax.contrib.MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)


def _last_key(path) -> Any:
    entry = path[-1] if path else None
    return getattr(entry, "key", getattr(entry, "name", None))


def muon_dims(params: Any) -> Any:
    """Muon's dimension numbers for an spdjax params tree: a leaf named in :data:`MATRIX_KEYS`
    with 2 or more axes is a matrix ``x @ W`` over its last two axes (reduction, output), its
    leading axes batch axes orthogonalised one by one (the per-component CI MLPs' weights
    (C, fan_in, fan_out): one matrix per component); every other leaf is None (Adam)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _MATRIX if _last_key(path) in MATRIX_KEYS and x.ndim >= 2 else None,
        params)


def _muon(learning_rate, **options) -> optax.GradientTransformation:
    """optax's Muon, its matrices chosen by :func:`muon_dims` unless
    ``muon_weight_dimension_numbers`` is given; every other leaf with Adam."""
    options.setdefault("muon_weight_dimension_numbers", muon_dims)
    return optax.contrib.muon(learning_rate, **options)


OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "sgd": optax.sgd,
    "muon": _muon,
})


def _accepted(factory: OptimizerFactory) -> set[str] | None:
    """Keyword options ``factory`` takes besides the learning rate (None: any, ``**kwargs``)."""
    target = optax.contrib.muon if factory is _muon else factory
    params = inspect.signature(target).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n in params if n != "learning_rate"}


def make(name: str | OptimizerFactory, learning_rate: Any,
         **options) -> optax.GradientTransformation:
    """``OPTIMIZERS[name](learning_rate, **options)``; an unknown name or option fails here, naming
    the value and what was expected."""
    factory = OPTIMIZERS.resolve(name)
    if not callable(learning_rate) and not (
            isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"Optimizer {name!r}: the learning rate must be a positive number or a "
                         f"schedule, got {learning_rate!r}.")
    if not callable(factory):
        raise ValueError(f"An optimizer must be a registered name or a factory; got {name!r}.")
    accepted = _accepted(factory)
    unknown = sorted(set(options) - accepted) if accepted is not None else []
    if unknown:
        raise ValueError(f"Optimizer {name!r} takes no options {unknown}; accepted: "
                         f"{sorted(accepted)}.")
    return factory(learning_rate, **options)


GROUPS = ("components", "ci")  # the parameter groups of a config's optimizer section


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """One group's optimizer in a config: a registered ``name``, its peak ``lr`` (0: the run's
    ``config.lr``) and the optimizer's keyword ``options``."""

    name: str = "adam"
    lr: float = 0.0
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def parse_groups(section: Mapping[str, Mapping[str, Any]],
                 where: str = "optimizer") -> dict[str, GroupSpec]:
    """A config's optimizer section ``{group: {name, lr, options}}`` -> ``{group: GroupSpec}``,
    checked: the groups are :data:`GROUPS`, each name registered, each lr a number >= 0, the
    options ones the optimizer takes. Errors name the field (``where.group.lr``) and the value."""
    if set(section) != set(GROUPS):
        raise ValueError(f"{where} must have exactly the groups {list(GROUPS)}; got "
                         f"{sorted(section)}.")
    specs = {}
    for group in GROUPS:
        entry = dict(section[group])
        extra = sorted(set(entry) - {"name", "lr", "options"})
        if extra:
            raise ValueError(f"{where}.{group} takes name, lr and options; got also {extra}.")
        spec = GroupSpec(**entry)
        spec = dataclasses.replace(spec, options=dict(spec.options or {}))
        if isinstance(spec.lr, bool) or not isinstance(spec.lr, (int, float)) or spec.lr < 0:
            raise ValueError(f"{where}.{group}.lr must be a number > 0 (or 0: the run's lr), got "
                             f"{spec.lr!r}.")
        try:
            make(spec.name, 1.0, **spec.options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}.{group}: {e}") from None
        specs[group] = spec
    return specs


def scaled(learning_rate: Any, peak: float, run_peak: float) -> Any:
    """``learning_rate`` (a float or schedule peaking at ``run_peak``) moved to peak at ``peak``:
    ``peak * learning_rate(step) / run_peak``, the run's schedule shape at the group's peak (a
    constant at the run's peak gives exactly ``peak``); ``learning_rate`` itself for ``peak`` 0
    or ``run_peak``."""
    if not peak or peak == run_peak:
        return learning_rate
    if callable(learning_rate):
        return lambda step: peak * (learning_rate(step) / run_peak)
    return peak * (learning_rate / run_peak)


def groups_from_config(section: Mapping[str, Mapping[str, Any]], learning_rate: Any,
                       run_peak: float) -> dict[str, optax.GradientTransformation]:
    """``{group: transformation}`` for a config's optimizer section, each on the run's schedule
    ``learning_rate`` scaled to the group's peak lr. Groups with equal specs get one and the same
    transformation (one state for both: the paper's single Adam over every parameter)."""
    built: list[tuple[GroupSpec, optax.GradientTransformation]] = []
    out = {}
    for group, spec in parse_groups(section).items():
        same = [t for s, t in built if s == spec]
        if not same:
            same = [make(spec.name, scaled(learning_rate, spec.lr, run_peak), **spec.options)]
            built.append((spec, same[0]))
        out[group] = same[0]
    return out


def by_group(transforms: Mapping[str, optax.GradientTransformation]
             ) -> optax.GradientTransformation:
    """``params[g]`` updated by ``transforms[g]`` alone, with its own state ``state[g]``: a
    partition of the params by their top-level keys, which must be those of ``transforms``."""

    def check(tree, what):
        if set(tree) != set(transforms):
            raise ValueError(f"by_group has optimizers for {sorted(transforms)}; the {what} have "
                             f"groups {sorted(tree)}.")

    def init_fn(params):
        check(params, "params")
        return {g: t.init(params[g]) for g, t in transforms.items()}

    def update_fn(updates, state, params=None):
        check(updates, "updates")
        out, new_state = dict(updates), {}
        for g, t in transforms.items():
            out[g], new_state[g] = t.update(updates[g], state[g],
                                            None if params is None else params[g])
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)
