"""Stochastic Parameter Decomposition as a :class:`~spdjax.methods.base.Method`.

* init: component factors (``paper`` or ``gaussian``) and CI functions
  (:meth:`~spdjax.core.decomposition.Decomposition.init`), then an optional faithfulness warm-up;
* objective: the weighted sum of loss terms (:mod:`spdjax.losses`) on one context per step;
  metrics ``loss/total``, ``loss/<term>`` (unweighted) and ``ci_l0/<site>``;
* optimizer: Adam (the paper's), or one optimizer per parameter group (components, CI functions:
  :mod:`spdjax.methods.optimizers`, e.g. Muon), plus the tied-copy sync for ``tie_mode="aliased"``;
* evaluate: loss terms, CI-L0 and alive subcomponents on an evaluation batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax.core.decomposition import (Decomposition, alive_components, check_cost_options, ci_l0,
                                       decompose)
from spdjax.losses import Context, Term, faithfulness, make_context, terms_from_config, total_loss
from spdjax.core.components import COMPONENT_INITS, ComponentInit, init_paper
from spdjax.losses.adversarial import ADVERSARY
from spdjax.losses.minimality import couples_examples
from spdjax.methods import adversary, optimizers
from spdjax.methods.base import Method, MethodSpec, Objective, register

ADVERSARY_KEY = 0x41445653  # fold_in index of the adversaries' init key ("ADVS")

Array = jax.Array


CI_NOISE_KEY = 0x43494E5A  # fold_in index of the CI-input noise's key ("CINZ")


def objective(
    decomposition: Decomposition, terms: Sequence[Term], *, l0_threshold: float = 0.1,
    ci_lower_noise: float = 0.0,
) -> Objective:
    """The SPD objective ``(params, target_params, batch, key, step_frac, hparams=None) ->
    (total, metrics)``: the weighted sum of ``terms`` (:func:`spdjax.losses.term`), with the
    coefficients ``hparams`` (``{term name: value}``, may be traced) gives in place of the bound
    ones. ``ci_lower_noise`` > 0 adds the later reference's binomial-sampling CI-input noise
    (``(1 + eps) r - eps u`` into the lower sigmoid) from the step's key."""
    if not isinstance(ci_lower_noise, (int, float)) or not 0 <= ci_lower_noise < 1:
        raise ValueError(f"ci_lower_noise must be a number in [0, 1) (the reference uses 0.05 with "
                         f"binomial sampling), got {ci_lower_noise!r}.")
    total_fn = total_loss(terms)

    def fn(params, target_params, batch, key, step_frac, hparams=None):
        ctx = make_context(decomposition, target_params, params, batch, step_frac,
                           ci_lower_noise=ci_lower_noise,
                           key=jax.random.fold_in(key, CI_NOISE_KEY) if ci_lower_noise else None)
        total, values = total_fn(params, ctx, key, hparams)
        metrics = {
            "loss": {"total": total, **values},
            "ci_l0": {n: ci_l0(c.lower, l0_threshold) for n, c in ctx.ci.items()},
        }
        return total, metrics

    return fn


def aliased_tie_updates(decomposition: Decomposition, *,
                        within: str | None = "components") -> optax.GradientTransformation:
    """Adds the updates of each tied pair's two copies and gives both the sum
    (``tie_mode="aliased"``).

    Chained after the optimizer: ``u_owner + swap(u_tied)`` goes to the owner and its
    swap-transpose (``V <- Uᵀ``, ``U <- Vᵀ``) to the tied copy, so copies that start equal stay
    equal, each moved by both of its own optimizer steps, as in the reference. The components
    are ``updates[within]`` (``within=None``: the updates are the components themselves).
    """

    def update_fn(updates, state, params=None):
        del params
        comps = dict(updates if within is None else updates[within])
        for tied, owner in decomposition.ties.items():
            u_owner, u_tied = comps[owner], comps[tied]
            merged = {"V": u_owner["V"] + u_tied["U"].T, "U": u_owner["U"] + u_tied["V"].T}
            comps[owner], comps[tied] = merged, {"V": merged["U"].T, "U": merged["V"].T}
        return (comps if within is None else {**updates, within: comps}), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip_groups(max_norms: dict[str, float]) -> optax.GradientTransformation:
    """Clips each named group of the gradient (``"components"``, ``"ci"``) to its own global L2
    norm (the later reference's ``grad_clip_norm_components`` / ``grad_clip_norm_ci_fns``)."""
    clips = {group: optax.clip_by_global_norm(norm) for group, norm in max_norms.items()}

    def update_fn(updates, state, params=None):
        del params
        out = dict(updates)
        for group, clip in clips.items():
            out[group], _ = clip.update(updates[group], optax.EmptyState())
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(decomposition: Decomposition, learning_rate, *,
                   clip_components: float = 0.0, clip_ci: float = 0.0,
                   base: Callable[[Any], optax.GradientTransformation] = optax.adam,
                   groups: dict[str, optax.GradientTransformation] | None = None,
                   ) -> optax.GradientTransformation:
    """``base(learning_rate)`` (default Adam: β 0.9/0.999, eps 1e-8, no weight decay, the
    paper's), plus the tied-copy sync for ``tie_mode="aliased"``. ``learning_rate`` is a float or
    an optax schedule; ``base`` any optax optimizer factory (e.g.
    ``functools.partial(optax.adamw, weight_decay=0.01)``). ``clip_*`` > 0 clip the gradient norm
    of the factors / the CI functions before the optimizer (0: no clipping).

    ``groups`` gives ``"components"`` and/or ``"ci"`` an optimizer of its own (e.g.
    ``optimizers.make("muon", 0.02)``), with its own learning rate and state
    (:func:`~spdjax.methods.optimizers.by_group`); a group it leaves out gets
    ``base(learning_rate)``. One transformation given for both groups moves them together, with
    one state, as ``base`` does."""
    parts = []
    norms = {g: float(n) for g, n in (("components", clip_components), ("ci", clip_ci)) if n}
    if norms:
        parts.append(clip_groups(norms))
    unknown = sorted(set(groups or {}) - set(optimizers.GROUPS))
    if unknown:
        raise ValueError(f"groups {unknown}: the optimizer's groups are {list(optimizers.GROUPS)}.")
    if groups:
        per_group = {g: groups.get(g) or base(learning_rate) for g in optimizers.GROUPS}
        shared = all(t is per_group["components"] for t in per_group.values())
        parts.append(per_group["components"] if shared else optimizers.by_group(per_group))
    else:
        parts.append(base(learning_rate))
    if decomposition.ties and decomposition.tie_mode == "aliased":
        parts.append(aliased_tie_updates(decomposition))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def faithfulness_warmup(
    components: dict,
    faithfulness_fn: Callable[[dict], Array],
    *,
    steps: int,
    lr: float = 0.01,
    weight_decay: float = 0.1,
    tie_sync: optax.GradientTransformation | None = None,
) -> dict:
    """Minimises ``faithfulness_fn(components)`` alone with AdamW (later reference: 200/0.01/0.1).

    ``tie_sync`` (e.g. :func:`aliased_tie_updates` with ``within=None``) is chained after AdamW,
    so tied copies move as in training: by both of their updates, and stay equal.
    """
    if steps <= 0:
        return components
    opt = optax.adamw(lr, weight_decay=weight_decay)
    if tie_sync is not None:
        opt = optax.chain(opt, tie_sync)

    def body(carry, _):
        comps, state = carry
        grads = jax.grad(faithfulness_fn)(comps)
        updates, state = opt.update(grads, state, comps)
        return (optax.apply_updates(comps, updates), state), None

    (components, _), _ = jax.lax.scan(body, (components, opt.init(components)), None, length=steps)
    return components


def init_fn(
    decomposition: Decomposition, *, init: ComponentInit = init_paper, warmup_steps: int = 0,
    warmup_lr: float = 0.01, warmup_weight_decay: float = 0.1, terms: Sequence[Term] = (),
) -> Callable[[Array, Any], dict]:
    """``(key, target_params) -> params``: factors + CI functions, then the warm-up if any, and
    the persistent state of adversarial ``terms`` (:mod:`spdjax.methods.adversary`)."""

    def fn(key, target_params):
        params = decomposition.init(key, target_params, init=init)
        if adversary.adversarial_terms(terms):
            params[ADVERSARY] = adversary.init_adversary(decomposition, terms,
                                                         jax.random.fold_in(key, ADVERSARY_KEY))
        if warmup_steps > 0:
            ctx = Context(decomposition=decomposition, target_params=target_params, batch=None,
                          target_out=None, site_inputs={}, ci={}, step_frac=jnp.float32(0))

            def faith(comps):
                return faithfulness({"components": comps, "ci": params["ci"]}, ctx)

            aliased = decomposition.ties and decomposition.tie_mode == "aliased"
            sync = aliased_tie_updates(decomposition, within=None) if aliased else None
            params["components"] = jax.jit(
                lambda c: faithfulness_warmup(c, faith, steps=warmup_steps, lr=warmup_lr,
                                              weight_decay=warmup_weight_decay, tie_sync=sync)
            )(params["components"])
        return params

    return fn


PAPER_L0_THRESHOLD = 0.01
PAPER_L0_KEY = "ci_l0_at_0.01"


def evaluate_fn(decomposition: Decomposition, objective_fn: Objective, *, l0_threshold: float,
                eval_terms: Sequence[Term] = (), ci_lower_noise: float = 0.0):
    """Loss terms and CI-L0 (as the objective's metrics; also ``ci_l0_at_0.01``, the paper-era
    code's threshold), the ``eval_terms`` (as ``eval_loss``), and alive subcomponents per site.

    The CI is computed as in training: with ``ci_lower_noise`` > 0 the evaluation's CI (its
    eval terms, CI-L0 at 0.01, alive counts) sees the same σ_lo input noise as the objective's,
    from the evaluation key (the reference's evaluation computes CI with the run's sampling
    mode, so its binomial runs evaluate with the noise too: goodfire-ai/spd ``eval.py``).

    With ``microbatches > 1`` the batch is evaluated in that many equal chunks (chunk ``i`` with
    key ``fold_in(key, i)``): the means are averaged and a subcomponent is alive if it is in any
    chunk, so only the masks' draws differ from the one-chunk result.
    """
    objective_jit = jax.jit(objective_fn)
    # Built once: a chunked evaluation compiles it once, not once per chunk.
    context_jit = jax.jit(lambda p, tp, b, k: make_context(
        decomposition, tp, p, b, 1.0, ci_lower_noise=ci_lower_noise,
        key=jax.random.fold_in(k, CI_NOISE_KEY) if ci_lower_noise else None))
    eval_jit = jax.jit(lambda p, ctx, k: {t.name: t(p, ctx, k) for t in eval_terms})

    def one(params, target_params, batch, key):
        _, metrics = objective_jit(params, target_params, batch, key, 1.0)
        ctx = context_jit(params, target_params, batch, key)
        if eval_terms:
            metrics["eval_loss"] = eval_jit(params, ctx, key)
        alive = {n: alive_components(np.asarray(c.lower), l0_threshold) for n, c in ctx.ci.items()}
        # The paper-era code logged CI-L0 at 0.01 (the later reference and spdjax: 0.1).
        metrics[PAPER_L0_KEY] = {n: ci_l0(c.lower, PAPER_L0_THRESHOLD) for n, c in ctx.ci.items()}
        return jax.device_get(metrics), alive

    def fn(params, target_params, batch, key, *, microbatches: int = 1) -> dict:
        if microbatches == 1:
            metrics, alive = one(params, target_params, batch, key)
        else:
            chunks = jax.tree.map(
                lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:]), batch)
            parts = [one(params, target_params, jax.tree.map(lambda x: x[i], chunks),
                         jax.random.fold_in(key, i)) for i in range(microbatches)]
            metrics = jax.tree.map(lambda *v: np.mean(v), *[m for m, _ in parts])
            alive = {n: np.any([a[n] for _, a in parts], axis=0) for n in parts[0][1]}
        summary: dict[str, Any] = jax.tree.map(float, metrics)
        summary["alive"] = {n: int(np.sum(a)) for n, a in alive.items()}
        return summary

    return fn


def method(
    decomposition: Decomposition, terms: Sequence[Term], learning_rate, *,
    init: ComponentInit | str = init_paper, warmup_steps: int = 0, l0_threshold: float = 0.1,
    warmup_lr: float = 0.01, warmup_weight_decay: float = 0.1, clip_components: float = 0.0,
    clip_ci: float = 0.0, eval_terms: Sequence[Term] = (), ci_lower_noise: float = 0.0,
    group_optimizers: dict[str, optax.GradientTransformation] | None = None,
) -> Method:
    """SPD on ``decomposition`` with loss ``terms``; ``learning_rate`` a float or schedule;
    ``eval_terms`` are computed by the final evaluation only; ``group_optimizers`` as
    :func:`make_optimizer`'s ``groups`` (default: Adam at ``learning_rate`` for everything)."""
    terms = adversary.resolve_source_optimizers(terms)  # stateful terms' optimizer names
    obj = objective(decomposition, terms, l0_threshold=l0_threshold,
                    ci_lower_noise=ci_lower_noise)
    optimizer = make_optimizer(decomposition, learning_rate, clip_components=clip_components,
                               clip_ci=clip_ci, groups=group_optimizers)
    if adversary.adversarial_terms(terms):
        optimizer = adversary.with_adversary(optimizer, adversary.term_optimizers(terms))
    return Method(
        name="spd",
        hparams={t.name: t.coeff for t in terms},
        decomposition=decomposition,
        init=init_fn(decomposition, init=COMPONENT_INITS.resolve(init), warmup_steps=warmup_steps,
                     warmup_lr=warmup_lr, warmup_weight_decay=warmup_weight_decay, terms=terms),
        objective=obj,
        optimizer=optimizer,
        partition_specs=functools.partial(adversary.partition_specs, decomposition),
        evaluate=evaluate_fn(decomposition, obj, l0_threshold=l0_threshold,
                             eval_terms=eval_terms, ci_lower_noise=ci_lower_noise),
    )


def from_config(config, experiment, learning_rate) -> Method:
    """SPD from a run config (names resolved here) on an experiment's target and sites."""
    warmup = config.faithfulness_warmup_steps
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError("faithfulness_warmup_steps must be an integer >= 0, got "
                         f"{config.faithfulness_warmup_steps!r}.")
    decomp = decompose(experiment.target, experiment.sites, ties=experiment.ties,
                       ci_fn=config.ci_fn, ci_hidden=tuple(config.ci_hidden),
                       ci_options=config.ci_options.to_dict(), sigmoid=config.sigmoid,
                       tie_mode=config.tie_mode, output_chunk=config.output_chunk,
                       remat_ci=config.remat_ci, compute_dtype=config.compute_dtype)
    built = method(decomp, terms_from_config(config.losses.to_dict()), learning_rate,
                   init=COMPONENT_INITS.get(config.init),
                   warmup_steps=config.faithfulness_warmup_steps,
                   warmup_lr=config.faithfulness_warmup_lr,
                   warmup_weight_decay=config.faithfulness_warmup_weight_decay,
                   l0_threshold=config.l0_threshold,
                   clip_components=config.grad_clip_norm_components,
                   clip_ci=config.grad_clip_norm_ci,
                   ci_lower_noise=config.ci_lower_noise,
                   eval_terms=eval_terms_from_config(config.eval_losses.to_dict()),
                   group_optimizers=optimizers.groups_from_config(
                       config.optimizer.to_dict(), learning_rate, config.lr))
    # every loss coefficient of the config is a traced hparam (a sweep shares one step)
    return dataclasses.replace(built, config_hparams={f"losses.{name}.coeff": name
                                                      for name in config.losses})


def eval_terms_from_config(eval_losses: dict) -> list[Term]:
    """``{name: options}`` (no coeff: they are reported, not optimised) -> bound terms."""
    for name, options in eval_losses.items():
        if "coeff" in options:
            raise ValueError(f"eval_losses.{name}: evaluation-only terms take no coeff; got "
                             f"options {sorted(options)}.")
    if not eval_losses:
        return []
    return terms_from_config({n: {"coeff": 0.0, **o} for n, o in eval_losses.items()})


def check_config(config, target=None) -> None:
    """SPD's config fields (its loss terms and evaluation-only terms), before any work."""
    del target
    check_cost_options(output_chunk=config.output_chunk, remat_ci=config.remat_ci,
                       compute_dtype=config.compute_dtype)
    rows = config.batch_size // max(config.microbatches, 1)
    if config.output_chunk > rows:
        raise ValueError(f"output_chunk={config.output_chunk} is more rows than a step's batch "
                         f"holds ({rows}: batch_size {config.batch_size} / microbatches "
                         f"{config.microbatches}); use a chunk of at most {rows} rows, or 0 for "
                         "the whole batch at once.")
    optimizers.parse_groups(config.optimizer.to_dict())
    terms = terms_from_config(config.losses.to_dict())
    if all(t.coeff == 0 for t in terms):
        names = ", ".join(f"losses.{t.name}.coeff" for t in terms)
        raise ValueError(f"Every loss coefficient is 0 ({names}): the objective is identically "
                         "zero and nothing would train; set at least one coeff > 0.")
    adversary.resolve_source_optimizers(terms)  # an unknown source optimizer fails here
    eval_terms = eval_terms_from_config(config.eval_losses.to_dict())
    stateful = [t.name for t in adversary.adversarial_terms(eval_terms)]
    if stateful:
        raise ValueError(f"eval_losses {stateful} keep state across training steps; they can "
                         "only be training terms (losses).")
    coupled = [t.name for t in terms if couples_examples(t.fn, t.options)]
    if coupled and config.microbatches > 1:
        raise ValueError(
            f"Loss terms {coupled} take log2(1 + S_c) of a sum over the whole batch (frequency "
            f"minimality); with microbatches={config.microbatches} each chunk would use its own "
            "smaller sum, a different loss and gradient. Use microbatches=1 (a smaller "
            "batch_size if memory is short), or drop the frequency part (beta=0 where the "
            "term has one).")
    stateful = [t.name for t in adversary.adversarial_terms(terms)]
    if stateful and config.microbatches > 1:
        raise ValueError(f"Loss terms {stateful} keep state across steps (persistent sources, an "
                         f"EMA) that each step replaces; with microbatches={config.microbatches} "
                         "the chunks' replacements would be averaged (and per-example sources "
                         "would cycle over each chunk): use microbatches=1.")
    shared = [t.name for t in terms if t.options.get("scope") == "shared_across_batch"]
    if shared and config.microbatches > 1:
        raise ValueError(f"Loss terms {shared} share their adversarial sources across the batch; "
                         f"with microbatches={config.microbatches} each chunk would get its own "
                         "(a weaker adversary): use microbatches=1.")
    for t in adversary.adversarial_terms(terms):
        shape = t.options.get("batch_shape")
        if t.options.get("scope") in ("repeat_across_batch", "per_batch_per_position") and (
                shape is not None and len(shape) and shape[0] != config.batch_size):
            raise ValueError(f"Loss {t.name!r}: batch_shape {tuple(shape)} starts with "
                             f"{shape[0]} examples but batch_size is {config.batch_size}; a "
                             "per-example source scope needs batch_shape[0] == batch_size "
                             f"(e.g. --config.losses.{t.name}.batch_shape="
                             f"\"({config.batch_size},)\").")


SPEC = register(MethodSpec("spd", build=from_config, check_config=check_config))
