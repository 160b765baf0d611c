"""Target families as values: :class:`Family` (a small public protocol), the open registry
:data:`FAMILIES`, and :class:`Experiment`, one family's target ready for a method.

A family says everything that is specific to one kind of target: its variants, the target model
and its trained params, which sites are decomposed (and tied), the data, and (optionally) the
ground-truth evaluation and figures. The run layer (:func:`spdjax.training.loop.setup`) takes a
family as a value, so a model of your own gets the whole managed run (checkpoints, resume,
divergence stop, workdir lock, writers, progress, figures) from a :class:`Family` you build in
your script; registering it (:func:`register`) makes it nameable from configs
(``config.experiment``). The built-in families (:mod:`spdjax.families`) register themselves.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping

import jax

from spdjax.core.registry import Registry
from spdjax.core.target import Target
from spdjax.training import targets as target_training


def _no_evaluation(decomposition, params, target_params, cfg, *, steps=None) -> dict:
    del decomposition, params, target_params, cfg, steps
    return {}


def _no_figures(decomposition, params, target_params, cfg, figures_dir) -> list:
    del decomposition, params, target_params, cfg, figures_dir
    return []


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One family of targets. ``cfg`` below is a model config (one of ``variants``; any value).

    Required:
      name: registry name (``config.experiment``).
      target: ``cfg -> Target`` (structure only; no training).
      load_target_params: ``(cfg, seed, cache_dir) -> params``, trained, cached or given.
      sites: ``(cfg, run config) -> {pattern: C}`` of the sites to decompose.
      sample: ``(cfg, key, batch_size) -> batch`` of decomposition training data.

    Optional:
      title: a human name (default: ``name``).
      variants: ``{name: cfg}`` (default ``{"default": None}``); ``default_variant`` one of them.
      evaluate: ``(decomposition, params, target_params, cfg, *, steps) -> summary dict`` of
        ground-truth metrics (default: none); ``decomposition`` is a
        :class:`~spdjax.methods.base.DecompositionView`.
      plot: ``(decomposition, params, target_params, cfg, figures_dir) -> [paths]`` (default:
        no figures beyond the training curves).
      ties: ``{tied site: owner site}``.
      cache_stem, report: the target cache's file stem and a one-line report of a cached
        target (for ``python -m spdjax.cli.target``); None for a family without a cache.
    """

    name: str
    target: Callable[[Any], Target]
    load_target_params: Callable[[Any, int, Any], Any]
    sites: Callable[[Any, Any], dict[str, int]]
    sample: Callable[[Any, jax.Array, int], Any]
    title: str = ""
    variants: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"default": None})
    default_variant: str = "default"
    evaluate: Callable[..., dict] = _no_evaluation
    plot: Callable[..., list] = _no_figures
    ties: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cache_stem: Callable[[Any, int, Any], str] | None = None
    report: Callable[[Any, Any, dict, str], str] | None = None

    def __post_init__(self):
        if not self.title:
            object.__setattr__(self, "title", self.name)
        if self.default_variant not in self.variants:
            raise ValueError(f"Family {self.name!r}: default_variant {self.default_variant!r} "
                             f"is not one of its variants {sorted(self.variants)}.")

    def variant(self, name: str):
        if name not in self.variants:
            raise ValueError(f"Unknown {self.title} variant {name!r}; "
                             f"valid: {sorted(self.variants)}.")
        return self.variants[name]

    def model_config(self, config):
        """The run config's variant with its ``target_recipe`` fields, trained for
        ``config.target_steps`` steps if that is set."""
        cfg = self.variant(config.variant)
        recipe = dict(config.get("target_recipe", {}))
        if not dataclasses.is_dataclass(cfg):  # a family without a recipe dataclass
            if recipe or config.get("target_steps", 0):
                raise ValueError(f"The {self.title} family has no target recipe to change; got "
                                 f"target_recipe={recipe}, target_steps="
                                 f"{config.get('target_steps', 0)}.")
            return cfg
        unknown = sorted(set(recipe) - {f.name for f in dataclasses.fields(cfg)})
        if unknown:
            raise ValueError(f"target_recipe fields {unknown} are not fields of the {self.title} "
                             f"recipe; expected some of "
                             f"{[f.name for f in dataclasses.fields(cfg)]}.")
        if config.target_steps:
            recipe["steps"] = config.target_steps
        return dataclasses.replace(cfg, **recipe)


@dataclasses.dataclass(frozen=True, eq=False)
class Experiment:
    """A target problem ready for a method: what the loop and the analysis need.

    ``batch_fn``/``eval_batch_fn`` map a key to a batch of the training / evaluation size (the
    former runs inside the jitted step). ``evaluate(decomposition, params)`` and
    ``plot(decomposition, params, figures_dir)`` are the family's ground-truth metrics and figures.
    """

    family: Family
    model_config: Any
    target: Target
    target_params: Any
    sites: dict[str, int]
    ties: Mapping[str, str]
    batch_fn: Callable[[jax.Array], Any]
    eval_batch_fn: Callable[[jax.Array], Any]

    def evaluate(self, decomposition, params, *, steps: int | None = None) -> dict:
        """Ground-truth metrics; ``steps``: how long the params trained (None: unknown)."""
        return self.family.evaluate(decomposition, params, self.target_params, self.model_config,
                                    steps=steps)

    def plot(self, decomposition, params, figures_dir: str | pathlib.Path) -> list:
        figures_dir = pathlib.Path(figures_dir)
        figures_dir.mkdir(parents=True, exist_ok=True)
        return self.family.plot(decomposition, params, self.target_params, self.model_config,
                                figures_dir)


FAMILIES: Registry[Family] = Registry("experiment")


def register(family: Family) -> Family:
    """Adds ``family`` to :data:`FAMILIES` under its name (``config.experiment``); returns it."""
    return FAMILIES.register(family.name, family)


def build_experiment(config, family: Family, *, target_params: Any = None) -> Experiment:
    """``family``'s experiment for a run config (``config.variant``, ``target_seed``, batch
    sizes); trains or loads the target unless ``target_params`` is given."""
    cfg = family.model_config(config)
    if target_params is None:
        cache_dir = config.target_cache_dir or target_training.default_cache_dir()
        target_params = family.load_target_params(cfg, config.target_seed, cache_dir)

    def batches(size):
        return lambda key: family.sample(cfg, key, size)

    return Experiment(
        family=family, model_config=cfg, target=family.target(cfg), target_params=target_params,
        sites=family.sites(cfg, config),
        ties=dict(family.ties) if config.get("tie_sites", True) else {},
        batch_fn=batches(config.batch_size), eval_batch_fn=batches(config.eval_batch_size),
    )
