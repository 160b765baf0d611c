"""What a decomposition method is to the run layer: :class:`Method`, built by a
:class:`MethodSpec` registered in :data:`METHODS`.

The run layer (:mod:`spdjax.training`) knows nothing about SPD. It asks a method for initial
parameters, an objective to differentiate, an optimizer, a sharding layout and an evaluation of
its own, and treats the parameters as an opaque pytree. SPD (:mod:`spdjax.methods.spd`) and APD
(:mod:`spdjax.methods.apd`) fill in the same fields; a new method is one module that builds a
:class:`Method` and registers its :class:`MethodSpec` (docs: "Extending").

The objective's metrics are a nested dict of scalars with at least ``metrics["loss"]["total"]``;
the run layer writes them flattened with ``/`` (``loss/total``, ``ci_l0/linear1``) to
``metrics.jsonl``.

Evaluations and figures see a method's decomposition through :class:`DecompositionView` only, so
none of them asks which method trained it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol

import jax
import optax

from spdjax.core.decomposition import match_sites
from spdjax.core.registry import Registry

Array = jax.Array
Params = Any
# (params, target_params, batch, key, step_frac[, hparams]) -> (loss, metrics); the sixth
# argument is passed when the method declares ``hparams``.
Objective = Callable[..., tuple[Array, dict]]


class DecompositionView(Protocol):
    """What every method's decomposition offers evaluations, figures and analysis.

    Attributes:
      target: the decomposed :class:`~spdjax.core.target.Target`.
      site_names: the decomposed sites.
      rank_one: whether components are rank one (then ``factors(params, site)`` is ``(V, U)``).
      causal_importance: ``(params, site_inputs) -> {site: CausalImportance}``, or None for a
        method without a CI function (APD).
    """

    target: Any
    site_names: tuple[str, ...]
    rank_one: bool
    causal_importance: Callable[..., Mapping[str, Any]] | None

    def component_weights(self, params: Params, name: str) -> Array:
        """``(C, d_in, d_out)``: every component's matrix at site ``name``."""

    def component_weight(self, params: Params, name: str) -> Array:
        """``(d_in, d_out)``: the sum of the components at site ``name``."""


@dataclasses.dataclass(frozen=True, eq=False)
class Method:
    """A decomposition method, ready to train on one target.

    Attributes:
      name: registry name (``"spd"``), recorded in checkpoints.
      decomposition: the method's static structure (a :class:`DecompositionView`).
      init: ``(key, target_params) -> params``.
      objective: see :data:`Objective`; pure, differentiated with respect to ``params``.
      optimizer: the optax transformation that trains ``params``.
      partition_specs: ``(params, model_axis) -> PartitionSpec pytree`` (C on ``model_axis``).
      evaluate: ``(params, target_params, batch, key, *, microbatches=1) -> summary dict``: the
        method's own final metrics on an evaluation batch, in ``microbatches`` chunks (the
        target family adds its ground-truth ones).
      hparams: ``{name: float}`` given to the objective as its sixth argument, as traced
        values: runs that differ only in them (a coefficient sweep) share one compiled step.
      config_hparams: ``{dotted config key: hparams name}``: which config fields are hparams
        (``"losses.importance_minimality.coeff" -> "importance_minimality"``).
    """

    name: str
    decomposition: Any
    init: Callable[[Array, Any], Params]
    objective: Objective
    optimizer: optax.GradientTransformation
    partition_specs: Callable[[Params, str], Any]
    evaluate: Callable[..., dict]
    hparams: Mapping[str, float] = dataclasses.field(default_factory=dict)
    config_hparams: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def hparams_of(self, config) -> dict[str, float]:
        """This method's hparams with the values ``config`` gives its config keys."""
        out = dict(self.hparams)
        for dotted, name in self.config_hparams.items():
            node = config
            for part in dotted.split("."):
                node = node[part]
            out[name] = float(node)
        return out


def _no_checks(config, target) -> None:
    del config, target


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How a run config becomes a :class:`Method` (what :data:`METHODS` holds).

    Attributes:
      name: the registry name (``config.method``).
      build: ``(config, experiment, learning_rate) -> Method``; ``experiment`` has ``target``,
        ``sites`` and ``ties``; ``learning_rate`` is a float or an optax schedule.
      check_config: ``(config, target) -> None``: the method's own config fields, checked
        before any target is trained (``target``: the structure only). Raises ``ValueError``.
    """

    name: str
    build: Callable[[Any, Any, Any], Method]
    check_config: Callable[[Any, Any], None] = _no_checks


METHODS: Registry[MethodSpec] = Registry("method")


def register(spec: MethodSpec) -> MethodSpec:
    """Adds ``spec`` to :data:`METHODS` under its name and returns it."""
    return METHODS.register(spec.name, spec)


# SPD's settings that a method without causal importances (APD, L3D) must leave at these values.
SPD_ONLY_DEFAULTS = {"faithfulness_warmup_steps": 0, "init": "paper",
                     "grad_clip_norm_components": 0.0, "grad_clip_norm_ci": 0.0,
                     "ci_lower_noise": 0.0, "output_chunk": 0, "remat_ci": False,
                     "compute_dtype": "float32"}
_DEFAULT_OPTIMIZER_GROUP = {"name": "adam", "lr": 0.0, "options": {}}


def refuse_spd_only_settings(config, method: str, *, extra: Mapping[str, Any] | None = None
                             ) -> None:
    """Raises ``ValueError`` naming every field of :data:`SPD_ONLY_DEFAULTS` (and ``extra``,
    ``{field: default}``) that ``config`` changes, every non-default ``config.optimizer`` group
    and any ``eval_losses``: SPD-only settings that ``method`` (``"APD"``) would silently
    ignore."""
    defaults = {**SPD_ONLY_DEFAULTS, **(extra or {})}
    changed = [f"{k}={config[k]!r}" for k, v in defaults.items() if config.get(k, v) != v]
    changed += [f"optimizer.{g}={v.to_dict()!r}" for g, v in config.get("optimizer", {}).items()
                if v.to_dict() != _DEFAULT_OPTIMIZER_GROUP]
    if changed or config.get("eval_losses"):
        raise ValueError(f"{method} does not use {', '.join(changed) or 'eval_losses'} (SPD-only "
                         f"settings); leave them at their defaults with method "
                         f"{method.lower()!r}.")


def spanning_sites(method: str, target, sites: Mapping[str, int], C: int, *,
                   refused_kind: str, message: str) -> tuple[str, ...]:
    """The sites of ``target`` matched by ``sites`` for a method whose ``C`` components span
    every site (their per-site C values are ignored), after checking that ``C`` is a positive
    integer and that no matched site is of kind ``refused_kind``. The error for such sites is
    ``"<method> decomposes " + message.format(<their names>)``."""
    if not isinstance(C, int) or isinstance(C, bool) or C < 1:
        raise ValueError(f"{method}: C must be a positive integer, got {C!r}.")
    names = tuple(match_sites(target, sites))
    refused = [n for n in names if target.sites[n].kind == refused_kind]
    if refused:
        raise ValueError(f"{method} decomposes {message.format(refused)}")
    return names
