"""Harvest: what every subcomponent does over a dataset, in one streaming pass (the later
reference's ``harvest`` stage, goodfire-ai/param-decomp ``param_decomp_lab/harvest``).

For each subcomponent (all sites' subcomponents in one list, site by site in the
decomposition's order; ``"site:c"`` names one) over ``n_batches`` batches of the run's data:

* **firing**: a subcomponent fires on an example (a toy's input vector, or a token position
  of a sequence model) when its CI (lower) is above ``threshold``: by default the run's
  ``l0_threshold`` (0.1 unless changed), the threshold of the CI-L0 the run logged and of the
  suite's L0, so "fires" here is "counted in L0" there. ``count``, ``density = count / n``
  and ``mean_ci`` (the mean CI over all examples);
* **co-occurrence**: ``cooc[i, j]`` = examples on which ``i`` and ``j`` both fire (every site
  against every site; the diagonal is ``count``); computed ``block`` rows at a time so a
  batch's extra memory is ``block x C_total`` whatever the total ``C_total``;
* **input and output "tokens"**, with precision ``P(token | fires)``, recall ``P(fires |
  token)`` and PMI ``log P(fires, token) / (P(fires) P(token))`` (natural log; -inf where they
  never meet):

  - sequence models (integer ids): the input token is the token at the position; the output
    token is the target model's top prediction there (argmax of its logits);
  - toys (float feature vectors): the input "tokens" of an example are its active features
    (``x_i != 0``; several per example, so precision summed over tokens may exceed 1); the
    output token is the output coordinate of largest magnitude, ``argmax_j |f(x)_j|`` of the
    target;
* **examples**: for each subcomponent, ``examples`` firings drawn uniformly at random from all
  its firings in the pass (reservoir sampling by random priorities: each firing gets an
  independent ``U[0, 1)`` priority from the batch's key and the ``examples`` largest are kept,
  a uniform sample without replacement that is merged batch by batch). Each keeps the batch
  and position, the CI, and for sequence models the ``window`` tokens on each side with the
  subcomponent's CI at each of them (``-1`` / NaN past the sequence's ends); for toys the
  input vector.

Library: :func:`harvest` (a loaded run in, a :class:`Harvest` out), :func:`load_harvest`
(both here; the result, :class:`Harvest`, and the spec live in
:mod:`~spdjax.analysis.harvest_result`).
Command: ``python -m spdjax.harvest --workdir=DIR`` (docs/guides/analysis.md).
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import grad_act, streaming
# Re-exported: the result and its loader, importable from here as the guide shows.
from spdjax.analysis.harvest_result import (  # noqa: F401
    DEFAULT_THRESHOLD, NO_PRIORITY, SUMMARY_FILE, Harvest, HarvestSpec, init_state, load_harvest)

Array = jax.Array
STATE_FILE = "state.npz"


def cooccurrence(fires: Array, block: int) -> Array:
    """``fires.T @ fires`` as int32 counts (``fires`` ``[N, C]`` bool), ``block`` rows at a
    time (the float32 products are exact while ``N < 2**24``)."""
    f = fires.astype(jnp.float32)
    C = f.shape[1]
    if block >= C:
        return jnp.einsum("nc,nd->cd", f, f).astype(jnp.int32)
    rows = [jnp.einsum("nc,nd->cd", f[:, i:i + block], f).astype(jnp.int32)
            for i in range(0, C, block)]
    return jnp.concatenate(rows, axis=0)


def observe(spec: HarvestSpec, state: dict, ci: Array, inputs: Array, out_tokens: Array,
            key: Array, batch_index: Array | int) -> dict:
    """``state`` after one batch (pure; jit it).

    ``ci``: every site's CI concatenated, ``[B, T, C]`` (tokens) or ``[B, C]`` (features);
    ``inputs``: ids ``[B, T]`` or features ``[B, n_in]``; ``out_tokens``: the output token per
    example, ``[B, T]`` or ``[B]``; ``key``: the batch's reservoir key."""
    lead = ci.shape[:-1]
    N, C = int(np.prod(lead)), spec.C
    if N >= 2 ** 24:
        raise ValueError(f"A batch of {N} examples/tokens is too large for exact float32 counts "
                         "(< 2**24): use smaller batches.")
    g = ci.reshape(N, C).astype(jnp.float32)
    fires = g > spec.threshold
    fi = fires.astype(jnp.int32)
    out = dict(state)
    out["n"] = state["n"] + N
    out["count"] = state["count"] + fi.sum(0)
    out["ci_sum"] = state["ci_sum"] + g.sum(0)
    out["cooc"] = state["cooc"] + cooccurrence(fires, spec.block)
    otok = out_tokens.reshape(N)
    out["out_count"] = state["out_count"] + jnp.bincount(otok, length=spec.n_out).astype(
        jnp.int32)
    out["out_fire"] = state["out_fire"] + jax.ops.segment_sum(fi, otok, spec.n_out).T
    if spec.kind == "tokens":
        itok = inputs.reshape(N)
        out["in_count"] = state["in_count"] + jnp.bincount(itok, length=spec.n_in).astype(
            jnp.int32)
        out["in_fire"] = state["in_fire"] + jax.ops.segment_sum(fi, itok, spec.n_in).T
    else:
        present = (inputs != 0).astype(jnp.float32)
        out["in_count"] = state["in_count"] + present.sum(0).astype(jnp.int32)
        out["in_fire"] = state["in_fire"] + jnp.einsum(
            "nc,ni->ci", fires.astype(jnp.float32), present).astype(jnp.int32)
    out.update(_reservoir(spec, state, g, fires, inputs, key, batch_index))
    return out


def _reservoir(spec: HarvestSpec, state: dict, g: Array, fires: Array, inputs: Array,
               key: Array, batch_index) -> dict:
    """The reservoirs merged with this batch's firings: every firing gets a ``U[0, 1)``
    priority, each subcomponent keeps its ``examples`` largest among old and new."""
    N, C = g.shape
    K = min(spec.examples, N)
    u = jax.random.uniform(key, (N, C))
    pri = jnp.where(fires, u, NO_PRIORITY).T  # [C, N]
    new_p, idx = jax.lax.top_k(pri, K)  # [C, K] positions in the flattened batch
    comp = jnp.arange(C)[:, None]
    new = {"ex_priority": new_p, "ex_ci": g[idx, comp],
           "ex_batch": jnp.full(idx.shape, batch_index, jnp.int32),
           "ex_pos": idx.astype(jnp.int32)}
    if spec.kind == "tokens":
        B, T = inputs.shape
        w = spec.window
        b, t = idx // T, idx % T
        offs = t[..., None] + jnp.arange(-w, w + 1)  # [C, K, 2w+1]
        inside = (offs >= 0) & (offs < T)
        safe = jnp.clip(offs, 0, T - 1)
        bb = jnp.broadcast_to(b[..., None], safe.shape)
        new["ex_tokens"] = jnp.where(inside, inputs[bb, safe], -1).astype(jnp.int32)
        g3 = g.reshape(B, T, C)
        cc = jnp.broadcast_to(comp[..., None], safe.shape)
        new["ex_window_ci"] = jnp.where(inside, g3[bb, safe, cc], jnp.nan)
    else:
        new["ex_inputs"] = inputs.astype(jnp.float32)[idx]
    pri_all = jnp.concatenate([state["ex_priority"], new["ex_priority"]], axis=1)
    keep_p, keep = jax.lax.top_k(pri_all, spec.examples)
    merged = {"ex_priority": keep_p}
    for name, v in new.items():
        if name == "ex_priority":
            continue
        both = jnp.concatenate([state[name], v.astype(state[name].dtype)], axis=1)
        sel = keep.reshape(keep.shape + (1,) * (both.ndim - 2))
        merged[name] = jnp.take_along_axis(both, sel, axis=1)
    return merged


# -- the pass over a run's data -------------------------------------------------------------
def sampler(run, batch_size: int) -> Callable[[Array], Any]:
    """``key -> batch`` of ``batch_size`` from the run's data distribution (the experiment's
    ``sample(key, batch_size)`` if it has one, else its family's ``sample``)."""
    experiment = run.experiment
    if hasattr(experiment, "sample"):
        return lambda key: experiment.sample(key, batch_size)
    return lambda key: experiment.family.sample(experiment.model_config, key, batch_size)


def spec_for(run, *, threshold: float | None = None, examples: int = 10, window: int = 8,
             block: int = 1024, batch_size: int = 64) -> HarvestSpec:
    """The :class:`HarvestSpec` of a loaded run (its sites, its data's kind and vocabularies,
    read off one batch's shapes)."""
    d = run.decomposition
    if d.causal_importance is None:
        raise ValueError("This decomposition has no CI function (APD): a harvest counts CI "
                         "firings; harvest an SPD or VPD run.")
    if threshold is None:
        threshold = float(run.config.get("l0_threshold", DEFAULT_THRESHOLD)) \
            if getattr(run, "config", None) is not None else DEFAULT_THRESHOLD
    batch = jax.eval_shape(sampler(run, batch_size), jax.random.key(0))
    if not isinstance(batch, jax.ShapeDtypeStruct):
        raise ValueError("harvest reads batches that are one array (token ids or feature "
                         f"vectors); this run's batches are {type(batch).__name__}.")
    out = jax.eval_shape(lambda x: d.target.forward(run.target_params, x, {})[0],
                         batch)
    tokens = jnp.issubdtype(batch.dtype, jnp.integer)
    # token ids: the input vocabulary is the embedding's (it may exceed the output's width)
    n_in = (d.target.sites[grad_act.token_embedding_site(d, run.target_params, batch)].d_in
            if tokens else batch.shape[-1])
    return HarvestSpec(sites=tuple(d.site_names), sizes=tuple(int(d.C[s]) for s in d.site_names),
                       kind="tokens" if tokens else "features", n_in=int(n_in),
                       n_out=int(out.shape[-1]), threshold=float(threshold), examples=examples,
                       window=window, block=block)


def make_update(run, spec: HarvestSpec, batch_size: int) -> Callable[[dict, int, Array], dict]:
    """``(state, i, key) -> state``: batch ``i`` (data from ``fold_in(key, 0)``, reservoir
    priorities from ``fold_in(key, 1)``) observed; the per-batch work is one jitted call."""
    d, params, target_params = run.decomposition, run.params, run.target_params
    sample = sampler(run, batch_size)

    @jax.jit
    def step(state, i, key):
        batch = sample(jax.random.fold_in(key, 0))
        out, site_inputs = d.clean_forward(target_params, batch)
        ci = d.causal_importance(params, site_inputs)
        g = jnp.concatenate([ci[s].lower.astype(jnp.float32) for s in spec.sites], axis=-1)
        if spec.kind == "tokens":
            out_tok = jnp.argmax(out, axis=-1)
        else:
            out_tok = jnp.argmax(jnp.abs(out), axis=-1)
        return observe(spec, state, g, batch, out_tok.astype(jnp.int32),
                       jax.random.fold_in(key, 1), i)

    return lambda state, i, key: step(state, jnp.int32(i), key)


def settings(spec: HarvestSpec, *, seed: int, batch_size: int, step: int | None) -> dict:
    """The settings a saved state must match to be resumed."""
    return {"tool": "harvest", "threshold": spec.threshold, "examples": spec.examples,
            "window": spec.window, "sites": list(spec.sites), "sizes": list(spec.sizes),
            "kind": spec.kind, "seed": seed, "batch_size": batch_size, "step": step}


def harvest(run, *, n_batches: int = 100, batch_size: int = 64, seed: int = 0,
            threshold: float | None = None, examples: int = 10, window: int = 8,
            block: int = 1024, out_dir: str | pathlib.Path | None = None, save_every: int = 0,
            resume: bool = True, report: Callable[[int, int, float], None] | None = None
            ) -> Harvest:
    """Harvests a loaded run (:func:`spdjax.load`) over ``n_batches`` batches of
    ``batch_size`` from its data (batch ``i`` from ``fold_in(key(seed), i)``).

    With ``out_dir`` the accumulators are saved there every ``save_every`` batches and at the
    end (``state.npz``), and a saved state made with the same settings is continued
    (``resume``); the result is then also written (:meth:`Harvest.save`)."""
    if not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int; got {n_batches!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
    spec = spec_for(run, threshold=threshold, examples=examples, window=window, block=block,
                    batch_size=batch_size)
    meta = settings(spec, seed=seed, batch_size=batch_size, step=getattr(run, "step", None))
    out_dir = None if out_dir is None else pathlib.Path(out_dir)
    state, start, save = streaming.resume_point(
        None if out_dir is None else out_dir / STATE_FILE, init_state(spec), meta,
        n_batches=n_batches, resume=resume)
    state = streaming.accumulate(make_update(run, spec, batch_size), state, seed=seed,
                                 n_batches=n_batches, start=start, save=save,
                                 save_every=save_every, report=report)
    result = Harvest.from_state(spec, state, dict(meta, n_batches=n_batches))
    if out_dir is not None:
        result.save(out_dir)
    return result


# -- the result -----------------------------------------------------------------------------
