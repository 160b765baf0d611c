"""What APD costs next to SPD: step time and memory on the same targets, and how each grows with
C and with the batch.

    python -m benchmarks.apd_cost                  # -> benchmarks/results/apd_cost.{json,md}
    python -m benchmarks.apd_cost --steps=5 --grid=quick

Every row is the real jitted train step (``benchmarks.run``, a fresh process per row, compile
excluded) of ``configs/<model>.py:<variant>`` (SPD, the paper's recipe) or ``...+apd`` (APD, the
reference code's recipe), with only C and the batch set to the row's values, so both methods
decompose the same target at the same size. APD's gradient attributions are one backward pass
per output dimension (d_L = 5 for TMS 5-2, 100 for ResidMLP), over every example: that is the
cost the SPD paper calls impractical. Memory: XLA's temporaries of one compiled step and the
process's peak RSS.
"""

from __future__ import annotations

import argparse
import pathlib

from benchmarks.run import ROOT, run_in_subprocess, write_results

# (model config, C values, batch sizes): every (C, batch) pair is a row for each method
GRIDS = {
    "full": [("tms:5-2", (5, 20), (2048,)),
             ("resid_mlp:1", (50, 100, 200), (256,)),
             ("resid_mlp:1", (100,), (1024, 2048)),
             ("resid_mlp:2", (200,), (256,))],
    "quick": [("tms:5-2", (5,), (256,)), ("resid_mlp:1", (20,), (64,))],
}


def rows_for(grid: str, steps: int) -> list[dict]:
    rows = []
    for name, Cs, batches in GRIDS[grid]:
        for C in Cs:
            for batch in batches:
                for method, spec in (("SPD", name), ("APD", name + "+apd")):
                    overrides = {"C": C, "batch_size": batch, "microbatches": 1}
                    row = run_in_subprocess(spec, steps, overrides)
                    row["method"] = method
                    print(f"{spec} C {C} batch {batch}: {1e3 * row['s_per_step']:.1f} ms/step, "
                          f"XLA temp {row['xla_temp_mib']:.0f} MiB", flush=True)
                    rows.append(row)
    return rows


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['device']}, {info['cpu_count']} cores; jax {info['jax']}; commit "
             f"{info['commit']}; {info['date']}", "",
             "| target | C | batch | SPD ms/step | APD ms/step | APD / SPD | SPD GFLOP | APD GFLOP "
             "| SPD XLA temp MiB | APD XLA temp MiB | SPD peak RSS MiB | APD peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    pairs: dict[tuple, dict] = {}
    for r in rows:
        key = (r["config"].removesuffix("+apd"), r["C"], r["batch_size"])
        pairs.setdefault(key, {})[r["method"]] = r
    for (name, C, batch), p in pairs.items():
        s, a = p["SPD"], p["APD"]
        lines.append(
            f"| {name} | {C} | {batch} | {1e3 * s['s_per_step']:.1f} | {1e3 * a['s_per_step']:.1f} "
            f"| {a['s_per_step'] / s['s_per_step']:.1f}x | {s['flops_per_step'] / 1e9:.2f} "
            f"| {a['flops_per_step'] / 1e9:.2f} | {s['xla_temp_mib']:.0f} "
            f"| {a['xla_temp_mib']:.0f} "
            f"| {s['peak_rss_mib']:.0f} | {a['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "apd_cost"))
    args = parser.parse_args(argv)
    write_results(pathlib.Path(args.out), rows_for(args.grid, args.steps), to_markdown)


if __name__ == "__main__":
    main()
