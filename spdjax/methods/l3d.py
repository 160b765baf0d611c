"""L3D, Local Loss Landscape Decomposition (Chrisman, Bushnaq, Sharkey 2025, arXiv 2504.00194):
a third method beside SPD and APD.

Per sample ``x_i`` and a reference output ``y_r`` (another sample's target output), the gradient
``g_i = grad_W D(f(x_i; W), y_r)`` at the trained ``W_0`` (``vmap`` of ``grad``;
:meth:`~spdjax.methods.l3d_decomposition.L3DDecomposition.per_sample_grads`) is encoded into
``C`` subnetwork coordinates ``z = V_in g``, only the batch top-k of ``|z|`` is kept, and the
decoder reconstructs ``g_hat = V_out z_topk``. The loss is the normalised reconstruction error
``sum_b ||g - g_hat||^2 / sum_b ||g||^2`` (:mod:`spdjax.methods.l3d_terms`), computed from
the Tucker factors without forming the subnetworks' dense tensors or ``g_hat``, and on linear
sites from each weight's per-sample gradient kept as its outer-product factors (the site's input
and the gradient at its output;
:meth:`~spdjax.methods.l3d_decomposition.L3DDecomposition.loss_grads`) without forming it
either. After every
Adam step the decoder's directions are renormalised (:func:`renormalise`); the learning rate is
multiplied by ``lr_decay`` every ``lr_decay_steps`` steps (the reference's StepLR), and the first
``dense_steps`` steps keep (nearly) every coordinate (the reference's warm start, top-k 0.999).
With ``l3d.n_samples = N > 0`` the batches are the paper's epochs over one fixed training set of
``N`` samples (:func:`fixed_batches`) instead of fresh samples every step.

The subnetworks are the decoder's unit-scale directions in parameter space, sign arbitrary: not
a decomposition that sums to ``W`` (no faithfulness term), so evaluations that read
``component_weights`` see directions, and ML2R is not meaningful for them. Biases are part of
the decomposed space. What L3D cannot share with SPD/APD is listed in docs/guides/l3d.md.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax.methods.base import Method, MethodSpec, refuse_spd_only_settings, register
from spdjax.methods.l3d_decomposition import (DIVERGENCES, NORMALISATIONS, REFERENCES,  # noqa: F401
                                              L3DDecomposition, decompose_l3d, tucker)
from spdjax.methods.l3d_terms import (batch_topk_mask, encode, gram_terms, guarded_sq_errors,
                                      per_sample_error, reconstruction_errors, relative_error)

Array = jax.Array
DENSE_TOPK = 0.999  # the reference's top-k during its warm-start epochs


DATA_STREAM = 0x13D  # fold_in(key(seed), DATA_STREAM) draws the fixed training set
MAX_FIXED_STEPS = 2**22  # step = round(step_frac * steps) is exact in float32 below this


def fixed_batches(data, batch_size: int, key: Array) -> Callable[[Array], Any]:
    """``step -> batch``: epochs over the fixed training set ``data`` (a pytree of
    ``[N, ...]`` arrays), as the reference's shuffled ``DataLoader``: epoch ``e`` is the
    permutation ``permutation(fold_in(key, e), N)`` cut into ``ceil(N / batch_size)``
    batches; the last batch of an epoch, where the reference's is short, is filled from the
    start of the same permutation (a jitted step has one batch shape)."""
    n = jax.tree.leaves(data)[0].shape[0]
    if not 0 < batch_size <= n:
        raise ValueError(f"L3D fixed training set: batch_size must be in [1, N={n}], got "
                         f"{batch_size}.")
    per_epoch = -(-n // batch_size)

    def fn(step):
        epoch, pos = step // per_epoch, step % per_epoch
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), n)
        idx = perm[(pos * batch_size + jnp.arange(batch_size)) % n]
        return jax.tree.map(lambda a: a[idx], data)

    return fn


def objective(d: L3DDecomposition, *, topk: float, dense_frac: float = 0.0,
              batches: Callable[[Array], Any] | None = None, total_steps: int = 0,
              learning_rate: Callable[[Array], Array] | None = None):
    """``(params, target_params, batch, key, step_frac) -> (loss, metrics)``: the L3D loss on the
    batch's per-sample gradients; top-k :data:`DENSE_TOPK` while ``step_frac < dense_frac``.
    ``metrics["gram_form"]`` is 1 where the step took the factored error, 0 where its rounding
    estimate sent it to the explicit one (:func:`~spdjax.methods.l3d_terms.guarded_sq_errors`).

    With ``batches`` (``step -> batch``, e.g. :func:`fixed_batches`) the loop's ``batch`` is
    ignored and the step's batch is ``batches(round(step_frac * total_steps))`` (the loop
    passes ``step / total_steps``; exact for ``total_steps <=`` :data:`MAX_FIXED_STEPS`).
    With ``learning_rate`` (``step -> lr``, e.g. :func:`step_decay`) the metrics add
    ``lr_decayed``, its value at that step: the run layer's ``lr`` is its schedule before
    L3D's step decay."""
    if not 0 < topk <= 1:
        raise ValueError(f"L3D: topk must be a fraction in (0, 1], got {topk!r}.")
    if (batches is not None or learning_rate is not None) and not (
            0 < total_steps <= MAX_FIXED_STEPS):
        raise ValueError(f"L3D with a fixed training set or a learning_rate to report: "
                         f"total_steps must be in [1, {MAX_FIXED_STEPS}], got {total_steps!r}.")

    def fn(params, target_params, batch, key, step_frac):
        step = jnp.round(step_frac * total_steps).astype(jnp.int32)
        if batches is not None:
            batch = batches(step)
        grads = d.loss_grads(target_params, batch, key)
        k = jnp.where(step_frac < dense_frac, DENSE_TOPK, topk)
        sq_err, sq_norm, _, mask, gram_form = reconstruction_errors(d, params, grads, k)
        loss = relative_error(sq_err, sq_norm)
        metrics = {"loss": {"total": loss, "recon": loss},
                   "active_per_example": jnp.mean(jnp.sum(mask, axis=-1)),
                   "gram_form": gram_form.astype(jnp.float32)}
        if learning_rate is not None:
            metrics["lr_decayed"] = jnp.asarray(learning_rate(step), jnp.float32)
        return loss, metrics

    return fn


def renormalise(d: L3DDecomposition, how: str) -> optax.GradientTransformation:
    """After the optimizer: moves the decoder to :meth:`L3DDecomposition.normalise` of its
    updated value (the encoder is left as it is, as in the reference)."""
    if how not in NORMALISATIONS:
        raise ValueError(f"Unknown L3D normalisation {how!r}; expected one of {NORMALISATIONS}.")

    def update_fn(updates, state, params):
        moved = optax.apply_updates(params["decode"], updates["decode"])
        decode_update = jax.tree.map(jnp.subtract, d.normalise(moved, how), params["decode"])
        return {"encode": updates["encode"], "decode": decode_update}, state

    return optax.GradientTransformation(lambda p: optax.EmptyState(), update_fn)


def step_decay(learning_rate, *, decay: float, every: int):
    """``learning_rate(step) * decay ** (step // every)`` (``learning_rate`` a float or an optax
    schedule): the reference's ``StepLR``, counted in steps."""
    base = learning_rate if callable(learning_rate) else (lambda step: learning_rate)
    return lambda step: base(step) * decay ** (step // every)


def intervention_responses(d: L3DDecomposition, params, target_params, x) -> Array:
    """``[C, batch]``: ``||d f(x; W_0 + delta v_c) / d delta||^2`` at ``delta = 0``, how much
    moving the parameters along subnetwork ``c``'s (decoder) direction changes each sample's
    output (the L3D paper's intervention, to first order)."""
    theta0 = d.theta0(target_params)
    directions = {n: {t: jnp.moveaxis(tucker(f), -1, 0) for t, f in ts.items()}
                  for n, ts in params["decode"].items()}

    def one(v):
        _, dout = jax.jvp(lambda th: d.forward_at(target_params, th, x), (theta0,), (v,))
        return jnp.sum(dout.reshape(dout.shape[0], -1) ** 2, axis=-1)

    return jax.lax.map(one, directions)


def selectivity(d: L3DDecomposition, params, target_params, x, key, *, topk: float,
                n_refs: int = 4) -> dict:
    """Intervention selectivity: for each subnetwork, the share of the output change its
    direction causes (:func:`intervention_responses`) that falls on the samples that use it
    (those where it is in the batch top-k of the impacts ``|V_in[c] g_i|``, averaged over
    ``n_refs`` references, as the paper's impact). ``baseline``: the share of samples that use
    it, what an unselective direction would score. Means over subnetworks used by any sample.
    """

    @jax.jit  # one program (op by op, the n_refs gradient passes compile each op on its own)
    def shares(params, target_params, x, key):
        impacts = jnp.mean(jnp.stack([
            jnp.abs(encode(d, params, d.loss_grads(target_params, x, jax.random.fold_in(key, r))))
            for r in range(n_refs)]), axis=0)
        used = batch_topk_mask(impacts, topk)  # [batch, C]
        resp = intervention_responses(d, params, target_params, x)  # [C, batch]
        return jnp.sum(resp * used.T, axis=1) / (jnp.sum(resp, axis=1) + 1e-30), jnp.mean(
            used, axis=0)

    share, base = shares(params, target_params, x, key)
    alive = np.asarray(base) > 0
    share, base = np.asarray(share), np.asarray(base)
    return {"selectivity": float(share[alive].mean()) if alive.any() else float("nan"),
            "selectivity_baseline": float(base[alive].mean()) if alive.any() else float("nan"),
            "selectivity_per_subnetwork": share.tolist(),
            "use_fraction_per_subnetwork": base.tolist()}


def evaluate_fn(d: L3DDecomposition, *, topk: float, batch_size: int,
                selectivity_samples: int = 1024, train_data=None):
    """The reconstruction errors on the evaluation batch, taken in chunks of the training
    ``batch_size`` (the top-k is over a batch, so chunks of the size it trained on), how often
    each subnetwork is used, and the intervention selectivity on its first
    ``selectivity_samples`` examples. With ``train_data`` (the fixed training set) also
    ``recon_error_train``: the error on it, in its order and chunks of ``batch_size`` (the
    paper reports its training loss). ``gram_form_fraction``: the share of chunks whose two
    errors both came from the factored form (the rest were explicit:
    :func:`~spdjax.methods.l3d_terms.guarded_sq_errors`)."""

    @jax.jit
    def chunk_metrics(params, target_params, xs, key):
        def one(args):
            x, k = args
            grads = d.loss_grads(target_params, x, k)
            z = encode(d, params, grads)
            mask = batch_topk_mask(z, topk)
            terms = gram_terms(d, params, grads)
            err, sq_norm, ok = guarded_sq_errors(d, params, grads, terms, z * mask)
            dense, dense_norm, ok_dense = guarded_sq_errors(d, params, grads, terms, z)
            return (relative_error(err, sq_norm), relative_error(dense, dense_norm),
                    jnp.mean(per_sample_error(err, sq_norm)), jnp.mean(mask, axis=0),
                    (ok & ok_dense).astype(jnp.float32))
        keys = jax.random.split(key, xs.shape[0])
        return jax.lax.map(one, (xs, keys))

    def fn(params, target_params, batch, key, *, microbatches: int = 1) -> dict:
        del microbatches  # chunked by batch_size instead
        n = batch.shape[0] // batch_size
        if n < 1:
            raise ValueError(f"L3D evaluation: the eval batch ({batch.shape[0]}) is smaller than "
                             f"one training batch ({batch_size}).")
        k_chunks, k_sel, k_train = jax.random.split(key, 3)
        err, dense, per_sample, use, gram_form = jax.device_get(
            chunk_metrics(params, target_params, _chunks(batch, batch_size), k_chunks))
        use = np.mean(use, axis=0)
        summary: dict[str, Any] = {
            "loss": {"total": float(np.mean(err)), "recon": float(np.mean(err))},
            "recon_error": float(np.mean(err)), "recon_error_dense": float(np.mean(dense)),
            "per_sample_error": float(np.mean(per_sample)),
            "gram_form_fraction": float(np.mean(gram_form)),
            "alive": int(np.sum(use > 0)), "use_fraction": use.tolist()}
        if train_data is not None:
            train_err = chunk_metrics(params, target_params, _chunks(train_data, batch_size),
                                      k_train)[0]
            summary["recon_error_train"] = float(np.mean(jax.device_get(train_err)))
        sel_x = batch[:min(selectivity_samples, batch.shape[0])]
        summary.update(selectivity(d, params, target_params, sel_x, k_sel, topk=topk))
        return summary

    return fn


def _chunks(x: Array, size: int) -> Array:
    """``[n // size, size, ...]``: ``x``'s first ``n // size * size`` rows in chunks."""
    n = x.shape[0] // size
    return x[:n * size].reshape(n, size, *x.shape[1:])


def training_set(config, experiment):
    """The fixed training set of ``config.l3d.n_samples`` samples (None for 0: fresh samples
    every step), drawn from the family's data with ``fold_in(key(seed), DATA_STREAM)``."""
    n = config.l3d.n_samples
    if not n:
        return None
    key = jax.random.fold_in(jax.random.key(config.seed), DATA_STREAM)
    return experiment.family.sample(experiment.model_config, key, n)


def from_config(config, experiment, learning_rate) -> Method:
    """L3D from a run config (``config.l3d``; C from ``config.C``) on an experiment's target.
    Ties are ignored: each usage of a tied weight is its own tensor (module docstring of
    :mod:`spdjax.methods.l3d_decomposition`)."""
    a = config.l3d
    d = decompose_l3d(experiment.target, experiment.sites, config.C, rank=a.rank,
                      biases=a.biases, divergence=a.divergence, reference=a.reference)
    data = training_set(config, experiment)
    batches = None if data is None else fixed_batches(
        data, config.batch_size,
        jax.random.fold_in(jax.random.key(config.seed), DATA_STREAM + 1))
    lr = step_decay(learning_rate, decay=a.lr_decay, every=a.lr_decay_steps)
    obj = objective(d, topk=a.topk, dense_frac=a.dense_steps / config.steps, batches=batches,
                    total_steps=config.steps,
                    learning_rate=lr if config.steps <= MAX_FIXED_STEPS else None)
    optimizer = optax.chain(optax.adam(lr), renormalise(d, a.normalisation))
    return Method(name="l3d", decomposition=d, init=lambda key, tp: d.init(key),
                  objective=obj, optimizer=optimizer, partition_specs=d.partition_specs,
                  evaluate=evaluate_fn(d, topk=a.topk, batch_size=config.batch_size,
                                       train_data=data))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # True passes isinstance(_, int)


def check_config(config, target=None) -> None:
    """L3D's config fields, before any work."""
    del target
    a = config.l3d
    if not (isinstance(a.topk, (int, float)) and 0 < a.topk <= 1):
        raise ValueError(f"l3d.topk must be a fraction in (0, 1], got {a.topk!r}.")
    if not _is_int(a.rank) or a.rank < 1:
        raise ValueError(f"l3d.rank must be a positive integer, got {a.rank!r}.")
    for name, valid in (("divergence", DIVERGENCES), ("reference", REFERENCES),
                        ("normalisation", NORMALISATIONS)):
        if a[name] not in valid:
            raise ValueError(f"l3d.{name} must be one of {valid}, got {a[name]!r}.")
    if not isinstance(a.biases, bool):
        raise ValueError(f"l3d.biases must be true or false, got {a.biases!r}.")
    if not (isinstance(a.lr_decay, (int, float)) and 0 < a.lr_decay <= 1):
        raise ValueError(f"l3d.lr_decay must be in (0, 1], got {a.lr_decay!r}.")
    if not _is_int(a.lr_decay_steps) or a.lr_decay_steps < 1:
        raise ValueError(f"l3d.lr_decay_steps must be an integer >= 1, got {a.lr_decay_steps!r}.")
    if not _is_int(a.dense_steps) or not 0 <= a.dense_steps <= config.steps:
        raise ValueError(f"l3d.dense_steps must be an integer in [0, steps={config.steps}], got "
                         f"{a.dense_steps!r}.")
    n = a.n_samples
    if not _is_int(n) or n < 0 or 0 < n < config.batch_size:
        raise ValueError(f"l3d.n_samples must be 0 (fresh samples every step) or an integer >= "
                         f"batch_size={config.batch_size} (a fixed training set), got {n!r}.")
    if n and config.steps > MAX_FIXED_STEPS:
        raise ValueError(f"l3d.n_samples > 0 supports steps <= {MAX_FIXED_STEPS}, got "
                         f"{config.steps}.")
    if config.eval_batch_size < config.batch_size:
        raise ValueError(f"L3D evaluates in chunks of batch_size={config.batch_size}: "
                         f"eval_batch_size must be at least that, got {config.eval_batch_size}.")
    if config.microbatches != 1:
        raise ValueError(f"L3D takes its top-k over the whole batch: microbatches must be 1, got "
                         f"{config.microbatches}.")
    refuse_spd_only_settings(config, "L3D", extra={"init_candidates": 1, "ensemble": 1,
                                                   "ensemble_sweep": "", "eval_suite": False})


SPEC = register(MethodSpec("l3d", build=from_config, check_config=check_config))
