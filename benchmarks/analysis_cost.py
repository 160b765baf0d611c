"""What the dataset-wide analyses cost: the harvest and the dataset attributions, time and memory
against the number of subcomponents C and the dataset size (issue #39, "cost").

    python -m benchmarks.analysis_cost            # -> benchmarks/results/analysis_cost.{json,md}
    python -m benchmarks.analysis_cost --grid=quick

Each row is one pass in a fresh process over a ResidMLP-shaped target (100 sparse features,
``U[-1, 1)`` with probability 0.05, -> a 50-wide ReLU MLP -> 100 outputs, two decomposed sites
``mlp_in`` and ``mlp_out`` with C subcomponents each, per-site CI MLPs of width 16; untrained
factors: the cost does not depend on what was learned). Reported: the first batch (compile
included), the mean time of the other batches, the accumulators' size, and the process's peak
RSS. The CPU is shared with other jobs: the load average at the start of each row is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import types

import jax
import numpy as np

from benchmarks.run import ROOT, row_in_fresh_process, write_results

GRIDS = {  # (tool, C per site, batches, batch size)
    "full": [("harvest", C, 20, 256) for C in (100, 400, 1600)]
    + [("harvest", 400, n, 256) for n in (5, 80)]
    + [("attributions", C, 5, 64) for C in (100, 400)]
    + [("attributions", 100, n, 64) for n in (20,)],
    "quick": [("harvest", 50, 4, 64), ("attributions", 50, 3, 16)],
}


def tiny_run(C: int):
    """A run-like value (what the analyses read from ``spdjax.load``) of the synthetic target."""
    import spdjax
    from spdjax.core.target import Site, weight_at

    n, h = 100, 50

    def fn(p, x, hooks):
        a = jax.nn.relu(hooks("mlp_in", x, lambda v: v @ p["mlp_in"]["kernel"]))
        return x + hooks("mlp_out", a, lambda v: v @ p["mlp_out"]["kernel"])

    sites = [Site("mlp_in", "linear", n, h, weight_at(("mlp_in", "kernel"))),
             Site("mlp_out", "linear", h, n, weight_at(("mlp_out", "kernel")))]
    k1, k2 = jax.random.split(jax.random.key(0))
    tp = {"mlp_in": {"kernel": jax.random.normal(k1, (n, h)) / n ** 0.5},
          "mlp_out": {"kernel": jax.random.normal(k2, (h, n)) / h ** 0.5}}
    d = spdjax.decompose(spdjax.from_function(fn, sites), {"mlp_in": C, "mlp_out": C})

    def sample(key, batch_size):
        kv, km = jax.random.split(key)
        x = jax.random.uniform(kv, (batch_size, n), minval=-1.0, maxval=1.0)
        return x * (jax.random.uniform(km, (batch_size, n)) < 0.05)

    return types.SimpleNamespace(decomposition=d, params=d.init(jax.random.key(1), tp),
                                 target_params=tp, step=0, config=None,
                                 experiment=types.SimpleNamespace(sample=sample))


def one_row(tool: str, C: int, batches: int, batch_size: int) -> dict:
    from spdjax.analysis import dataset_attributions, harvest
    load = os.getloadavg()[0]
    run = tiny_run(C)
    times = []
    last = [time.perf_counter()]

    def report(done, total, seconds):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if tool == "harvest":
        res = harvest.harvest(run, n_batches=batches, batch_size=batch_size, report=report)
    else:
        res = dataset_attributions.dataset_attributions(run, n_batches=batches,
                                                        batch_size=batch_size, report=report)
    state_bytes = sum(np.asarray(v).nbytes for v in res.state.values())
    return {"tool": tool, "C_per_site": C, "C_total": 2 * C, "batches": batches,
            "batch_size": batch_size, "first_batch_s": times[0],
            "s_per_batch": float(np.mean(times[1:])) if len(times) > 1 else float("nan"),
            "state_mib": state_bytes / 2 ** 20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loadavg_1min": load, "device": jax.devices()[0].platform}


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['device']}, {info['cpu_count']} cores (shared; 1-min load average "
             f"per row); jax {info['jax']}; commit {info['commit']}; {info['date']}", "",
             "| tool | C per site | batches x size | first batch s (compile) | s / batch | "
             "accumulators MiB | peak RSS MiB | load |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tool']} | {r['C_per_site']} | {r['batches']} x {r['batch_size']} | "
                     f"{r['first_batch_s']:.1f} | {r['s_per_batch']:.3f} | {r['state_mib']:.1f} "
                     f"| {r['peak_rss_mib']:.0f} | {r['loadavg_1min']:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="full", choices=sorted(GRIDS))
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, in this process
    args = p.parse_args()
    if args.row:
        tool, C, n, b = args.row.split(",")
        print(json.dumps(one_row(tool, int(C), int(n), int(b))))
        return
    rows = []
    for tool, C, n, b in GRIDS[args.grid]:
        rows.append(row_in_fresh_process("benchmarks.analysis_cost", f"{tool},{C},{n},{b}"))
        r = rows[-1]
        print(f"{tool} C {C} x2, {n} x {b}: {r['s_per_batch']:.3f} s/batch, state "
              f"{r['state_mib']:.1f} MiB, RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    name = "analysis_cost" if args.grid == "full" else f"analysis_cost_{args.grid}"
    write_results(ROOT / "benchmarks" / "results" / name, rows, to_markdown)  # quick: not over full


if __name__ == "__main__":
    main()
