"""Issue #39's clustering ground truth on a ResidMLP 1-layer decomposition: does the MDL
clustering (:mod:`spdjax.analysis.clustering`) recover the known structure, each feature's
``mlp_in`` subcomponent its own mechanism and the co-activating ``mlp_out`` subcomponents one
(the SPD paper's Figs. 8 and 12: "a single rank-50 identity component"); and does it put each
feature's ``mlp_in`` and ``mlp_out`` subcomponents in one cluster (which the paper's solution,
with a dense ``mlp_out``, does not have)?

    python -m spdjax.cluster --workdir=workdir/resid_mlp_1_3k --batches=10 --batch_size=1024
    python -m benchmarks.reproduce.cluster_resid_mlp --workdir=workdir/resid_mlp_1_3k \\
        --alphas=0.1,0.3,1,3,10       # -> benchmarks/results/cluster_resid_mlp.{json,md}
    python -m spdjax.cluster --workdir=DIR ... --alpha=3 --out=DIR/analysis/clustering_alpha3
    python -m benchmarks.reproduce.cluster_resid_mlp --workdir=DIR \
        --clustering=DIR/analysis/clustering_alpha3 --alphas=2,3,5 --out=NAME

A feature's subcomponents, from the weights: on ``mlp_in`` the one the library's evaluation
chooses (:func:`spdjax.families.resid_mlp.evaluation.contributions`, the largest neuron
contribution); on ``mlp_out`` the one that writes most of the feature's read-off,
``argmax_c (relu(W_E[f] W_in) . V_out[:, c]) (U_out[c] . W_E[f])``. Per seed (the clusterings
the command saved, at their MDL minimum) and per ``alpha`` (seed 0's firings merged again), the
fraction of features whose two subcomponents share a cluster, beside chance (the same fraction
for mismatched features ``f != g``) and the clustering's shape.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.run import ROOT, write_results

import spdjax
from spdjax.analysis import clustering
from spdjax.families.resid_mlp import evaluation


def feature_subcomponents(run, layer: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(mlp_in, mlp_out)`` subcomponent of each feature (module docstring)."""
    d, p, tp = run.decomposition, run.params, run.target_params
    cfg = run.experiment.model_config
    W_E = np.asarray(tp["W_E"], np.float64)
    W_in = np.asarray(tp[f"layers_{layer}"]["mlp_in"]["kernel"], np.float64)
    V_out, U_out = (np.asarray(a, np.float64) for a in d.factors(p, f"layers_{layer}/mlp_out"))
    contrib = (np.maximum(W_E @ W_in, 0) @ V_out) * (W_E @ U_out.T)  # [F, C]
    return evaluation.contributions(d, p, tp, cfg)[layer]["chosen"], contrib.argmax(1)


def same_cluster(labels: np.ndarray, pairs_in: np.ndarray, pairs_out: np.ndarray) -> dict:
    """The fraction of features whose two subcomponents share a cluster, and chance."""
    li, lo = labels[pairs_in], labels[pairs_out]
    together = (li[:, None] == lo[None, :]) & (li[:, None] >= 0)
    F = len(li)
    off = ~np.eye(F, dtype=bool)
    return {"same": float(np.mean(np.diag(together))), "chance": float(together[off].mean())}


def known_structure(labels: np.ndarray, f_in: np.ndarray, live_out: np.ndarray) -> dict:
    """The SPD paper's solution (Figs. 8, 12): each feature's ``mlp_in`` subcomponent is its own
    mechanism, and the live ``mlp_out`` subcomponents, which all co-activate, are one rank-50
    component. ``in_alone``: the fraction of features whose ``mlp_in`` subcomponent shares its
    cluster with no other feature's; ``out_block``: the largest share of the live ``mlp_out``
    subcomponents (global indices ``live_out``) in one cluster."""
    li = labels[f_in]
    others = np.array([np.sum((li == li[f]) & (f_in != f_in[f])) for f in range(len(f_in))])
    lo = labels[live_out]
    block = max(np.sum(lo == v) for v in np.unique(lo)) if len(lo) else 0
    return {"in_alone": float(np.mean(others == 0)),
            "out_block": float(block / max(len(lo), 1)), "live_out": int(len(lo))}


def shape(h: clustering.MergeHistory, n_in: int, t=None) -> dict:
    """How the clusters mix the two sites."""
    cl = h.clusters(t)
    n_ins = np.array([sum(n.startswith("layers_0/mlp_in") for n in c) for c in cl])
    n_outs = np.array([len(c) for c in cl]) - n_ins
    return {"clusters": len(cl), "largest": max(len(c) for c in cl),
            "mixed": int(np.sum((n_ins > 0) & (n_outs > 0))),
            "mlp_in_only_multi": int(np.sum((n_ins > 1) & (n_outs == 0))),
            "mlp_out_only_multi": int(np.sum((n_outs > 1) & (n_ins == 0))),
            "singletons": int(np.sum(n_ins + n_outs == 1))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="workdir/resid_mlp_1_3k")
    ap.add_argument("--alphas", default="0.1,0.3,1,3,10")
    ap.add_argument("--out", default="cluster_resid_mlp")
    ap.add_argument("--clustering", default=None, help="the clustering's directory (default: "
                    "<workdir>/analysis/clustering; another when spdjax.cluster had --out)")
    args = ap.parse_args(argv)
    run = spdjax.load(args.workdir)
    f_in, f_out = feature_subcomponents(run)
    C_in = int(run.decomposition.C["layers_0/mlp_in"])
    res = clustering.load_clustering(args.clustering or run.workdir)
    D = res.distances()
    mask = ~np.eye(len(D), dtype=bool)
    h0 = next(iter(res.histories.values()))
    settings = dict(h0.meta)
    # seed 0's firings again (same settings): the live mlp_out subcomponents, the alpha sweep
    fires = clustering.firings(run, seed=settings["seed"], n_batches=settings["batches"],
                               batch_size=settings["batch_size"],
                               threshold=settings["threshold"],
                               max_examples=settings["max_examples"])
    live_out = C_in + np.flatnonzero(fires[:, C_in:].any(0))

    def row(h):
        labels = h.labels()
        return dict(same_cluster(labels, f_in, C_in + f_out), iteration=h.best_iteration,
                    **shape(h, C_in), **known_structure(labels, f_in, live_out))

    seeds = {str(s): row(h) for s, h in res.histories.items()}
    sweep = {str(a): row(clustering.merge(fires, h0.names, alpha=a))
             for a in (float(v) for v in args.alphas.split(","))}
    out = {"workdir": str(args.workdir), "settings": settings,
           "distinct_mlp_in": int(len(set(f_in))), "distinct_mlp_out": int(len(set(f_out))),
           "seeds": seeds, "distance_hamming": D.tolist(),
           "distance_hamming_mean": float(D[mask].mean()) if mask.any() else 0.0,
           "alpha_sweep_seed": settings["seed"], "alpha_sweep": sweep}
    lines = ["| | mlp_in alone | live mlp_out in one cluster | same cluster | chance | "
             "iteration | clusters | largest | mixed in+out | mlp_in-only (2+) | "
             "mlp_out-only (2+) | singletons |", "|---" * 12 + "|"]
    for name, rows in (("seed", seeds), ("alpha", sweep)):
        for k, r in rows.items():
            lines.append(f"| {name} {k} | {r['in_alone']:.2f} | {r['out_block']:.2f} of "
                         f"{r['live_out']} | {r['same']:.2f} | {r['chance']:.3f} | "
                         f"{r['iteration']} | {r['clusters']} | {r['largest']} | {r['mixed']} | "
                         f"{r['mlp_in_only_multi']} | {r['mlp_out_only_multi']} | "
                         f"{r['singletons']} |")
    write_results(ROOT / "benchmarks" / "results" / args.out, [out],
                  lambda rows, machine: "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
