"""Target families and the experiments built from them, by ``config.experiment``.

A :class:`Family` (TMS, ResidMLP, ...) says everything that is specific to one kind of toy
model: its variants, the target model and its trained params, which sites SPD decomposes (and
ties), the data, and the ground-truth evaluation and figures. :func:`build_experiment` turns a
run config into an :class:`Experiment`, the same for every family, which the training loop and
:func:`spdjax.load` use.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping

import jax

from spdjax.experiments import target_training
from spdjax.registry import Registry
from spdjax.target import Target


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One family of toy targets. ``cfg`` below is a model config (one of ``variants``).

    Attributes:
      name, title: registry name (``config.experiment``) and a human name.
      variants: ``{name: cfg}``; ``default_variant`` one of them.
      target: ``cfg -> Target`` (structure only; no training).
      load_target_params: ``(cfg, seed, cache_dir) -> params``, trained or from the cache.
      cache_stem, report: the cache file stem, and a one-line report of a cached target.
      sites: ``(cfg, run config) -> {pattern: C}``; ``ties``: ``{tied: owner}``.
      sample: ``(cfg, key, batch_size) -> batch`` of SPD training data.
      evaluate: ``(decomposition, params, target_params, cfg, *, steps) -> summary dict``
        (``steps``: how long the params trained, or None).
      plot: ``(decomposition, params, target_params, cfg, figures_dir) -> [paths]``.
    """

    name: str
    title: str
    variants: Mapping[str, Any]
    default_variant: str
    target: Callable[[Any], Target]
    load_target_params: Callable[[Any, int, Any], dict]
    cache_stem: Callable[[Any, int, Any], str]
    report: Callable[[dict, Any, dict, str], str]
    sites: Callable[[Any, Any], dict[str, int]]
    sample: Callable[[Any, jax.Array, int], Any]
    evaluate: Callable[..., dict]
    plot: Callable[..., list]
    ties: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_modules(cls, name: str, title: str, default_variant: str, model, evaluation, plots,
                     **fields) -> "Family":
        """A family from its package's three modules, by convention: ``model`` defines
        ``VARIANTS``, ``target``, ``load_or_train_target``, ``cache_stem``, ``report``, ``sites``,
        ``sample`` (and ``TIES`` if any); ``evaluation.evaluate``; ``plots.plot_run``."""
        return cls(name=name, title=title, variants=model.VARIANTS,
                   default_variant=default_variant, target=model.target,
                   load_target_params=model.load_or_train_target, cache_stem=model.cache_stem,
                   report=model.report, sites=model.sites, sample=model.sample,
                   evaluate=evaluation.evaluate, plot=plots.plot_run,
                   ties=getattr(model, "TIES", {}), **fields)

    def variant(self, name: str):
        if name not in self.variants:
            raise ValueError(f"Unknown {self.title} variant {name!r}; valid: {sorted(self.variants)}.")
        return self.variants[name]

    def model_config(self, config):
        """The run config's variant with its ``target_recipe`` fields, trained for
        ``config.target_steps`` steps if that is set."""
        cfg = self.variant(config.variant)
        recipe = dict(config.get("target_recipe", {}))
        unknown = sorted(set(recipe) - {f.name for f in dataclasses.fields(cfg)})
        if unknown:
            raise ValueError(f"target_recipe fields {unknown} are not fields of the {self.title} "
                             f"recipe; expected some of {[f.name for f in dataclasses.fields(cfg)]}.")
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


def _families() -> Registry[Family]:
    from spdjax.experiments import lm, resid_mlp, tms

    return Registry("experiment", {"tms": tms.FAMILY, "resid_mlp": resid_mlp.FAMILY,
                                   "lm": lm.FAMILY})


def get_family(name: str) -> Family:
    """The family registered as ``name`` (``config.experiment``)."""
    return _families().get(name)


def build_experiment(config, *, target_params: Any = None) -> Experiment:
    """The experiment of a run config; trains or loads the target unless ``target_params`` given."""
    family = get_family(config.experiment)
    cfg = family.model_config(config)
    if target_params is None:
        cache_dir = config.target_cache_dir or target_training.default_cache_dir()
        target_params = family.load_target_params(cfg, config.target_seed, cache_dir)

    def batches(size):
        return lambda key: family.sample(cfg, key, size)

    return Experiment(
        family=family, model_config=cfg, target=family.target(cfg), target_params=target_params,
        sites=family.sites(cfg, config), ties=dict(family.ties),
        batch_fn=batches(config.batch_size), eval_batch_fn=batches(config.eval_batch_size),
    )
