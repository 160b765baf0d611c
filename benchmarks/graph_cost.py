"""What one prompt's attribution graph costs, time and memory against C and the prompt length
(issue #39, "cost"; spdjax/analysis/graphs.py).

    python -m benchmarks.graph_cost               # -> benchmarks/results/graph_cost.{json,md}
    python -m benchmarks.graph_cost --grid=quick
    python -m benchmarks.graph_cost --grid=integrated --out=benchmarks/results/graph_cost_ig

Each row runs in a fresh process: the induction toy's transformer (d_model 16, 2 attention-only
layers, vocabulary 130; untrained weights, the cost does not depend on what was learned) with
its 8 attention projections decomposed into C subcomponents each, a prompt of T tokens, and a
fixed share of the subcomponent-positions active (CI drawn uniform, threshold at the
``1 - active`` quantile), so the graph has ``R ~ active * 8 * T * C`` component nodes plus 3
outputs; edges by gradient x activation or, in the ``integrated`` grid, integrated gradients
(16 steps). Reported: the first :func:`~spdjax.analysis.graphs.compute_graph` (compile included),
the second (steady), pruning, the graph's size, and the process's peak RSS. The CPU is shared
with other jobs: the load average at the start of each row is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import time

from benchmarks.run import ROOT, row_in_fresh_process, write_results

GRIDS = {  # (C per site, prompt length T, active share, edge attribution)
    "full": [(C, 32, 0.05, "gradient") for C in (8, 32, 128)]
    + [(32, T, 0.05, "gradient") for T in (16, 64)],
    "integrated": [(C, 32, 0.05, "integrated") for C in (8, 32, 128)],
    "quick": [(8, 8, 0.1, "gradient")],
}


def one(C: int, T: int, active: float, attribution: str = "gradient") -> dict:
    """One row, in this process."""
    import jax
    import jax.numpy as jnp

    import spdjax
    from spdjax.analysis import graphs
    from spdjax.families.lm import model as lm_model

    load = os.getloadavg()
    cfg = lm_model.VARIANTS["ih"]
    tp = lm_model.init_params(jax.random.key(0), cfg)
    d = spdjax.decompose(lm_model.target(cfg), {"blocks_*/attn/*": C})
    params = d.init(jax.random.key(1), tp)
    ids = jax.random.randint(jax.random.key(2), (1, T), 1, cfg.vocab)
    ci = {n: jax.random.uniform(jax.random.fold_in(jax.random.key(3), i), (1, T, C))
          for i, n in enumerate(d.site_names)}
    threshold = 1.0 - active
    row = {"C": C, "T": T, "active": active, "attribution": attribution,
           "loadavg": list(load)}
    for label in ("first_s", "steady_s"):
        t0 = time.perf_counter()
        g = graphs.compute_graph(d, params, tp, jnp.asarray(ids), threshold=threshold, top_k=3,
                                 ci=ci, attribution=attribution)
        row[label] = time.perf_counter() - t0
    t0 = time.perf_counter()
    graphs.prune(g, node_threshold=0.9)
    row["prune_s"] = time.perf_counter() - t0
    row["nodes"] = sum(n.kind == graphs.COMPONENT for n in g.nodes)
    row["edges"] = int(len(g.weights))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def markdown(rows: list[dict], machine: dict) -> str:
    lines = ["| C per site | T | edges from | component nodes | edges | first (s) | steady (s) "
             "| prune (s) | peak RSS (MB) | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['C']} | {r['T']} | {r.get('attribution', 'gradient')} | "
                     f"{r['nodes']} | {r['edges']} | {r['first_s']:.2f} | "
                     f"{r['steady_s']:.2f} | {r['prune_s']:.3f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['loadavg'][0]:.1f} |")
    return (f"Attribution-graph cost on {machine['device']}, {machine['cpu_count']} cores "
            f"(shared); {len(rows)} rows, one process each.\n\n"
            + "\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="full")
    p.add_argument("--row", help=argparse.SUPPRESS)  # "C,T,active,attr": a row, JSON on stdout
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "graph_cost"))
    args = p.parse_args(argv)
    if args.row:
        C, T, active, attribution = args.row.split(",")
        print(json.dumps(one(int(C), int(T), float(active), attribution)))
        return
    rows = []
    for C, T, active, attribution in GRIDS[args.grid]:
        rows.append(row_in_fresh_process("benchmarks.graph_cost",
                                         f"{C},{T},{active},{attribution}"))
        print(rows[-1], file=sys.stderr, flush=True)
    write_results(pathlib.Path(args.out), rows, markdown)


if __name__ == "__main__":
    main()
