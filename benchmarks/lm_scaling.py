"""Step time, compile time and memory of the transformer configs, and how they scale.

    python -m benchmarks.lm_scaling                 # writes benchmarks/results/lm_scaling.{json,md}
    python -m benchmarks.lm_scaling --steps=50 --quick

Each row is the real train step of ``configs/lm.py:<variant>`` (``benchmarks.run.measure`` in a
fresh process: seconds/step with compile excluded, compile seconds, XLA's temporaries of the
compiled step, peak RSS) with one setting changed from the config: the number of subcomponents
C, the sequence length, or the vocabulary (induction toy: V). Targets are trained 1 step
(``target_steps=1``): the step time does not depend on the target's values.
"""

from __future__ import annotations

import argparse
import pathlib

from benchmarks.run import ROOT, run_in_subprocess, write_results

# (variant, label, overrides)
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
]
QUICK = [0, 1, 3, 5, 7]


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['device']}, {info['cpu_count']} cores; jax {info['jax']}; commit "
             f"{info['commit']}; {info['date']}", "",
             "| config | setting | batch | ms/step | steps/s | compile s | XLA temp MiB "
             "| peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['label']} | {r['batch_size']} "
                     f"| {1e3 * r['s_per_step']:.1f} | {r['steps_per_s']:.1f} "
                     f"| {r['compile_s']:.1f} | {r['xla_temp_mib']:.0f} "
                     f"| {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="5 rows instead of 10")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_scaling"))
    args = parser.parse_args(argv)
    rows = []
    for i, (variant, label, overrides) in enumerate(GRID):
        if args.quick and i not in QUICK:
            continue
        row = run_in_subprocess(f"lm:{variant}", args.steps, {"target_steps": 1, **overrides})
        row["label"] = label
        print(f"lm:{variant} {label}: {1e3 * row['s_per_step']:.1f} ms/step, compile "
              f"{row['compile_s']:.1f} s, XLA temp {row['xla_temp_mib']:.0f} MiB", flush=True)
        rows.append(row)
    write_results(pathlib.Path(args.out), rows, to_markdown)


if __name__ == "__main__":
    main()
