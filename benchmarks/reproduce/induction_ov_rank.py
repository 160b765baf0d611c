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
    print(json.dumps(out, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
