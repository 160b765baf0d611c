"""How few rank-one pieces of the induction head's output projection can a sequence need?

    python -m benchmarks.reproduce.induction_ov_rank --workdir=workdir/induction_seeds/ih@2000_seed0

The induction criteria (docs/guides/language_models.md) ask for at most 8 active subcomponents
per site at the induction position ``e``. Layer 1's output projection copies any of the
vocabulary's tokens through the 16-dimensional stream, so one may fear it needs every direction
on every sequence. This measures the opposite bound on the run's target: split ``W_out`` of layer 1
into its singular directions (``W_out = sum_j s_j p_j q_jᵀ``, an exact decomposition into
``rank`` pieces), keep at ``e`` only the ``k`` pieces with the largest effect on the logits of
that sequence (``|s_j (a · p_j)| ‖q_j W_U‖``, ``a`` the head's mixed value), and count the
smallest ``k`` that keeps the target's answer on top and, separately, KL(target ‖ kept) below
``--kl``. An SPD decomposition may do better (it is not bound to orthogonal pieces) or worse
(its pieces are shared across sequences alike); the counts say whether the bound of 8 asks for
something a decomposition of this target can give.

The run's own side (``"decomposition"``): with every site masked by its CI, the KL at ``e`` that
zeroing each of layer 1's ``out`` subcomponents there adds (per subcomponent, mean over
sequences), and the KL when only the ``k`` subcomponents with the largest such cost are kept at
``e`` per sequence (KL from the target), beside the KL of the ``k`` best singular pieces of the
target's ``W_out``.
``minimality_per_subcomponent_at_e`` is what switching one subcomponent off at ``e`` saves in the
run's importance-minimality terms (their coefficients over the ``T`` positions they average, a CI
of 1 costing 1): a subcomponent stays active where its KL cost is larger.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.config import runs
from spdjax.families.lm import evaluation, induction
from spdjax.families.lm import model as lm_model
from spdjax.losses import make_context
from spdjax.training.family import FAMILIES


def head_inputs(params, cfg: lm_model.LMConfig, ids):
    """``(residual before layer 1's output is added [B, d], layer 1's mixed value at e [B, d])``
    at the last position (the toy's forward, :func:`induction.forward`, written out)."""
    T = ids.shape[-1]
    x = params["embed"]["embedding"][ids]
    pos = lm_model.sinusoids(T, cfg.d_model)
    causal = jnp.tril(jnp.ones((T, T), bool))
    for i in range(cfg.n_layers):
        q = (x + pos) @ induction._kernel(params, i, "q")
        k = (x + pos) @ induction._kernel(params, i, "k")
        v = x @ induction._kernel(params, i, "v")
        scores = jnp.einsum("bqd,bkd->bqk", q, k) / math.sqrt(cfg.d_model)
        mixed = jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(jnp.where(causal, scores, -1e30), -1),
                           v)
        if i == cfg.n_layers - 1:
            return x[:, -1], mixed[:, -1]
        x = x + mixed @ induction._kernel(params, i, "out")


def pieces_needed(params, cfg: lm_model.LMConfig, ids, labels, kl_max: float) -> dict:
    """Per sequence, the fewest singular pieces of the last layer's ``W_out`` that keep the
    answer (``"answer"``) and KL below ``kl_max`` (``"kl"``); ``[B]`` int arrays each."""
    rest, a = (np.asarray(t, np.float64) for t in head_inputs(params, cfg, ids))
    w_out = np.asarray(induction._kernel(params, cfg.n_layers - 1, "out"), np.float64)
    w_u = np.asarray(params["unembed"]["kernel"], np.float64)
    p, s, qt = np.linalg.svd(w_out)
    pieces = ((a @ p) * s)[:, :, None] * qt[None]  # [B, rank, d]: what each piece writes
    order = np.argsort(-np.linalg.norm(pieces @ w_u, axis=-1), axis=1)
    full = rest + pieces.sum(1)
    log_p = jax.nn.log_softmax(full @ w_u)
    labels = np.asarray(labels)
    rank = len(s)
    answer = np.full(len(a), rank)
    kl = np.full(len(a), rank)
    for k in range(rank, -1, -1):  # the first k in the order, every sequence at once
        kept = rest + np.take_along_axis(pieces, order[:, :k, None], axis=1).sum(1)
        log_q = jax.nn.log_softmax(kept @ w_u)
        kl_k = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
        answer = np.where(np.argmax(kept @ w_u, -1) == labels, k, answer)
        kl = np.where(kl_k < kl_max, k, kl)
    return {"answer": answer, "kl": kl, "singular_values": s}


def kl_keeping_top(pieces_logits, full_logits, costs, ks, reference_logits=None) -> dict:
    """``{k: mean KL(reference || kept)}`` keeping per sequence the ``k`` pieces of largest
    ``costs [B, P]`` (``pieces_logits [B, P, V]`` sum with the rest to ``full_logits [B, V]``;
    the reference defaults to the full logits)."""
    order = np.argsort(-costs, axis=1)
    rest = full_logits - pieces_logits.sum(1)
    log_p = jax.nn.log_softmax(full_logits if reference_logits is None else reference_logits)
    out = {}
    for k in ks:
        kept = rest + np.take_along_axis(pieces_logits, order[:, :k, None], axis=1).sum(1)
        log_q = jax.nn.log_softmax(kept)
        out[k] = round(float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1))), 5)
    return out


def decomposition_costs(run, cfg: lm_model.LMConfig, ids, ks=(2, 4, 8, 16)) -> dict:
    """The run's layer-1 ``out`` subcomponents at ``e`` (module docstring): each one's KL cost
    when zeroed, the KL keeping the ``k`` costliest, and the target's singular pieces alike."""
    d, p, tp = run.decomposition, run.params, run.target_params
    site = f"blocks_{cfg.n_layers - 1}/attn/out"
    ctx = jax.jit(lambda p, tp, i: make_context(d, tp, p, i))(p, tp, ids)
    ci = {n: c.lower for n, c in ctx.ci.items()}
    logits = jax.jit(lambda m: d.forward(tp, p, ids, m)[:, -1])
    log_t = jax.nn.log_softmax(ctx.target_out[:, -1])
    kl = lambda lo: np.asarray(jnp.sum(jnp.exp(log_t) * (log_t - jax.nn.log_softmax(lo)), -1))  # noqa: E731
    base = logits(ci)
    C = ci[site].shape[-1]
    costs = np.stack([kl(logits({**ci, site: ci[site].at[:, -1, c].set(0.0)})) for c in range(C)],
                     -1) - kl(base)[:, None]  # [B, C]
    # what each subcomponent writes into the logits at e: the difference it makes when zeroed
    pieces = np.stack([np.asarray(base - logits({**ci, site: ci[site].at[:, -1, c].set(0.0)}))
                       for c in range(C)], 1)  # [B, C, V]; linear in the masks of one site
    terms = [t for t in ("importance_minimality", "smooth_l0_importance_minimality")
             if t in run.config.losses]
    coeff = sum(float(run.config.losses[t].coeff) for t in terms)
    _, a = head_inputs(tp, cfg, ids)
    w_out = np.asarray(induction._kernel(tp, cfg.n_layers - 1, "out"), np.float64)
    w_u = np.asarray(tp["unembed"]["kernel"], np.float64)
    pvec, sv, qt = np.linalg.svd(w_out)
    sing = (((np.asarray(a, np.float64) @ pvec) * sv)[:, :, None] * qt[None]) @ w_u  # [B, r, V]
    target_logits = np.asarray(ctx.target_out[:, -1], np.float64)
    return {
        "site": site, "kl_at_e_ci_masked": float(kl(base).mean()),
        "kl_cost_per_subcomponent": [round(float(c), 5) for c in np.sort(costs.mean(0))[::-1]],
        "subcomponents_costing_over_1e-3_per_sequence": float((costs > 1e-3).sum(-1).mean()),
        "minimality_per_subcomponent_at_e": coeff / ids.shape[-1],
        "kl_keeping_top_k": kl_keeping_top(pieces, np.asarray(base), costs, ks,
                                           reference_logits=np.asarray(ctx.target_out[:, -1])),
        "target_kl_keeping_top_k_singular": kl_keeping_top(
            sing, target_logits, np.linalg.norm(sing, axis=-1), ks),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run of configs/lm.py:ih")
    parser.add_argument("--kl", type=float, default=0.1)
    parser.add_argument("--out", default="", help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    wd = pathlib.Path(args.workdir)
    run = runs.load(wd)
    cfg = FAMILIES.get("lm").model_config(run.config)
    induction.check_config(cfg)
    params = run.target_params
    ids, labels = evaluation.eval_batch(cfg)
    n = pieces_needed(params, cfg, ids, labels, args.kl)
    out = {"workdir": str(wd), "sequences": int(len(labels)), "kl_max": args.kl,
           "singular_values": np.round(n["singular_values"], 3).tolist()}
    for what in ("answer", "kl"):
        v = n[what]
        out[what] = {"median": float(np.median(v)), "mean": float(v.mean()),
                     "p90": float(np.percentile(v, 90)), "max": int(v.max()),
                     "over_8": float(np.mean(v > 8))}
    out["decomposition"] = decomposition_costs(run, cfg, ids)
    print(json.dumps(out, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
