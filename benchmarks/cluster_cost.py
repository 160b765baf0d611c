"""What the MDL clustering costs: time and memory of one seed's merge against the number of live
subcomponents C and the number of examples N (issue #39, "cost").

    python -m benchmarks.cluster_cost            # -> benchmarks/results/cluster_cost.{json,md}
    python -m benchmarks.cluster_cost --grid=quick

Each row is one :func:`spdjax.analysis.clustering.merge` to one group (``C - 1`` merges) in a
fresh process, on synthetic firings shaped like a decomposition's: ``3C / 8`` sparse
"features" (each fires with probability 0.05), each firing two subcomponents (perfect
partners), and the other ``C / 4`` subcomponents dense (probability 0.3): the merge's work
does not depend on what fires, only on ``N`` and ``C`` (``C - 1`` steps, each
``O(N C + C^2)``). Reported: the
first call (compile included), a second call (the merge alone), reading the clustering at its
MDL minimum plus the distance to a second seed's, the firings' size, and the process's peak
RSS. The CPU is shared with other jobs: the load average at the start of each row is recorded.
The pass over the run's data that produces the firings costs what a harvest pass does
(``benchmarks/analysis_cost.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import jax
import numpy as np

from benchmarks.run import ROOT, row_in_fresh_process, write_results

GRIDS = {  # (C live subcomponents, N examples)
    "full": [(C, 8192) for C in (100, 200, 400, 800, 1600)] + [(400, n) for n in (2048, 32768)],
    "quick": [(40, 512), (80, 512)],
}


def firings(C: int, N: int, seed: int) -> np.ndarray:
    """``[N, C]`` bool (module docstring)."""
    rng = np.random.default_rng(seed)
    F = 3 * C // 8
    x = rng.uniform(size=(N, F)) < 0.05
    out = np.concatenate([x, x, rng.uniform(size=(N, C - 2 * F)) < 0.3], axis=1)
    return out[:, np.random.default_rng(0).permutation(C)]


def one_row(C: int, N: int) -> dict:
    from spdjax.analysis import clustering
    load = os.getloadavg()[0]
    a, b = firings(C, N, 0), firings(C, N, 1)
    t0 = time.perf_counter()
    clustering.merge(a)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    h = clustering.merge(a)
    second = time.perf_counter() - t0
    hb = clustering.merge(b)
    t0 = time.perf_counter()
    d = clustering.partition_distance(h.labels(), hb.labels())
    read = time.perf_counter() - t0
    return {"C": C, "N": N, "first_s": first, "merge_s": second, "read_and_distance_s": read,
            "clusters": h.k(), "distance_between_seeds": d,
            "firings_mib": N * C * 4 / 2 ** 20,  # float32 in the merge
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loadavg_1min": load, "device": jax.devices()[0].platform}


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['device']}, {info['cpu_count']} cores (shared; 1-min load average "
             f"per row); jax {info['jax']}; commit {info['commit']}; {info['date']}", "",
             "| C | N | first call s (compile) | merge s | ms / merge | read + distance s | "
             "clusters | distance to seed 1 | firings MiB | peak RSS MiB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['C']} | {r['N']} | {r['first_s']:.1f} | {r['merge_s']:.2f} | "
                     f"{1e3 * r['merge_s'] / max(r['C'] - 1, 1):.2f} | "
                     f"{r['read_and_distance_s']:.3f} | {r['clusters']} | "
                     f"{r['distance_between_seeds']:.3f} | {r['firings_mib']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['loadavg_1min']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="full", choices=sorted(GRIDS))
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, in this process
    args = p.parse_args()
    if args.row:
        C, N = args.row.split(",")
        print(json.dumps(one_row(int(C), int(N))))
        return
    rows = []
    for C, N in GRIDS[args.grid]:
        rows.append(row_in_fresh_process("benchmarks.cluster_cost", f"{C},{N}"))
        r = rows[-1]
        print(f"C {C}, N {N}: merge {r['merge_s']:.2f} s, RSS {r['peak_rss_mib']:.0f} MiB, "
              f"load {r['loadavg_1min']:.1f}", flush=True)
    name = "cluster_cost" if args.grid == "full" else f"cluster_cost_{args.grid}"
    write_results(ROOT / "benchmarks" / "results" / name, rows, to_markdown)


if __name__ == "__main__":
    main()
