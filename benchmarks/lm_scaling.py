"""Step time, compile time and memory of the transformer configs, and how they scale.

    python -m benchmarks.lm_scaling                 # writes benchmarks/results/lm_scaling.{json,md}
    python -m benchmarks.lm_scaling --steps=50 --quick

Each row is the real train step of ``configs/lm.py:<variant>`` (``benchmarks.run.measure`` in a
fresh process: seconds/step with compile excluded, compile seconds, XLA's temporaries of the
compiled step, peak RSS) with one setting changed from the config: the number of subcomponents
C, the sequence length, the vocabulary (induction toy: V), or the memory and precision options
(``output_chunk``: batch rows per output-divergence chunk; ``remat_ci``; ``compute_dtype``).
Targets are trained 1 step (``target_steps=1``): the step time does not depend on the target's
values. Each row records the 1-minute load average when it finished (``os.getloadavg``): on a
shared machine the ms/step are under that load, while XLA's temporaries are the compiled
program's and do not depend on it.
"""

from __future__ import annotations

import argparse
import os
import pathlib

from benchmarks.run import ROOT, run_in_subprocess, write_results

# (variant, label, overrides)
_V = {"target_recipe.n_tokens": 4094}  # induction toy: vocabulary 4096
_GT = {"ci_fn": "global_transformer"}  # the bytes LM with a transformer CI function (VPD's kind)
GRID = [
    ("ih", "default (C 32, T 64, V 128)", {}),
    ("ih", "C 64", {"C": 64}),
    ("ih", "C 128", {"C": 128}),
    ("ih", "T 32", {"target_recipe.seq_len": 32, "target_recipe.prefix_window": 29}),
    ("ih", "T 128", {"target_recipe.seq_len": 128, "target_recipe.prefix_window": 125}),
    ("ih", "V 512", {"target_recipe.n_tokens": 512}),
    ("ih", "V 2048", {"target_recipe.n_tokens": 2048}),
    ("bytes", "default (C 96, T 128, vocab 256)", {}),
    ("bytes", "C 128", {"C": 128}),
    ("bytes", "T 256", {"target_recipe.seq_len": 256}),
    # the memory and precision options (issue #38 item 5)
    ("ih", "vocab 4096", _V),
    ("ih", "vocab 4096, output_chunk 8", {**_V, "output_chunk": 8}),
    ("ih", "vocab 4096, output_chunk 1", {**_V, "output_chunk": 1}),
    ("ih", "vocab 4096, bfloat16", {**_V, "compute_dtype": "bfloat16"}),
    ("ih", "remat_ci", {"remat_ci": True}),
    ("bytes", "output_chunk 2", {"output_chunk": 2}),
    ("bytes", "remat_ci", {"remat_ci": True}),
    ("bytes", "bfloat16", {"compute_dtype": "bfloat16"}),
    ("bytes", "global transformer CI", _GT),
    ("bytes", "global transformer CI, remat_ci", {**_GT, "remat_ci": True}),
    ("bytes", "global transformer CI, all three", {**_GT, "remat_ci": True, "output_chunk": 2,
                                                   "compute_dtype": "bfloat16"}),
]
QUICK = [0, 3, 7, 10, 11, 13, 14, 18, 19]


def _load(row: dict) -> str:
    return f"{row['loadavg_1min']:.1f}" if "loadavg_1min" in row else "-"  # older rows: not kept


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['device']}, {info['cpu_count']} cores; jax {info['jax']}; commit "
             f"{info['commit']}; {info['date']}", "",
             "| config | setting | batch | ms/step | steps/s | compile s | XLA temp MiB "
             "| peak RSS MiB | load (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['label']} | {r['batch_size']} "
                     f"| {1e3 * r['s_per_step']:.1f} | {r['steps_per_s']:.1f} "
                     f"| {r['compile_s']:.1f} | {r['xla_temp_mib']:.1f} "
                     f"| {r['peak_rss_mib']:.0f} | {_load(r)} |")
    lines += ["", "ms/step and compile s were measured on a CPU shared with other work (the load "
              "column: the 1-minute load average as each row finished); XLA temp MiB is the "
              "compiled step's and does not depend on the load."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK)} rows of {len(GRID)}")
    parser.add_argument("--rows", default="", help="comma-separated row numbers of GRID only")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_scaling"))
    args = parser.parse_args(argv)
    chosen = [int(i) for i in args.rows.split(",") if i] or (QUICK if args.quick else
                                                              range(len(GRID)))
    rows = []
    for i, (variant, label, overrides) in enumerate(GRID):
        if i not in chosen:
            continue
        row = run_in_subprocess(f"lm:{variant}", args.steps, {"target_steps": 1, **overrides})
        row["label"] = label
        row["loadavg_1min"] = os.getloadavg()[0]
        print(f"lm:{variant} {label}: {1e3 * row['s_per_step']:.1f} ms/step, compile "
              f"{row['compile_s']:.1f} s, XLA temp {row['xla_temp_mib']:.0f} MiB", flush=True)
        rows.append(row)
    write_results(pathlib.Path(args.out), rows, to_markdown)


if __name__ == "__main__":
    main()
