"""What each training term costs: step time of TMS 5-2 and ResidMLP 1 with different loss sets.

    python -m benchmarks.term_costs                     # -> benchmarks/results/term_costs.{json,md}
    python -m benchmarks.term_costs --configs=tms:5-2 --steps=100

Each loss set is timed by ``benchmarks.run`` (the real jitted train step, compile excluded, in a
fresh process). PGD multiplies the forward and backward passes by its ``n_steps``, so it is
measured against ``n_steps``; the ratio column is the step time over the paper recipe's.
"""

from __future__ import annotations

import argparse
import pathlib

from benchmarks.run import ROOT, run_in_subprocess, write_results

IMP = {"tms:5-2": {"coeff": 3e-3, "pnorm": 1.0}, "resid_mlp:1": {"coeff": 1e-5, "pnorm": 2.0}}


def loss_sets(imp: dict) -> dict[str, dict]:
    """Name -> loss config, from the paper's recipe to the later reference's terms."""
    sr = {"coeff": 1.0, "n_samples": 1}
    delta = {**sr, "delta": True}
    sets = {
        "paper (faith + SR + SRL + imp)": {"faithfulness": {"coeff": 1.0}, "stochastic_recon": sr,
                                           "stochastic_recon_layerwise": sr,
                                           "importance_minimality": imp},
        "later (SR + SRL with delta + imp)": {"stochastic_recon": delta,
                                              "stochastic_recon_layerwise": delta,
                                              "importance_minimality": imp},
        "subset SR with delta + imp": {"stochastic_recon_subset": delta,
                                       "importance_minimality": imp},
        "imp + frequency (beta 1)": {"stochastic_recon": delta,
                                     "importance_minimality": {**imp, "beta": 1.0}},
    }
    for n in (1, 2, 4, 8):
        sets[f"subset SR + PGD subset, n_steps {n}"] = {
            "stochastic_recon_subset": delta, "importance_minimality": imp,
            "pgd_recon_subset": {"coeff": 1.0, "n_steps": n, "step_size": 0.5, "delta": True,
                                 "scope": "shared_across_batch"}}
    sets["SR + persistent PGD, 2 warm-up steps"] = {
        "stochastic_recon": delta, "importance_minimality": imp,
        "persistent_pgd_recon": {"coeff": 1.0, "n_steps": 2, "step_size": 0.1, "delta": True}}
    return sets


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['device']}, {info['cpu_count']} cores; jax {info['jax']}; commit "
             f"{info['commit']}; {info['date']}", "",
             "| config | loss set | ms/step | x paper recipe | GFLOP/step |",
             "|---|---|---|---|---|"]
    base = {}
    for r in rows:
        base.setdefault(r["config"], r["s_per_step"])
        lines.append(f"| {r['config']} | {r['loss_set']} | {1e3 * r['s_per_step']:.1f} "
                     f"| {r['s_per_step'] / base[r['config']]:.2f} "
                     f"| {r['flops_per_step'] / 1e9:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tms:5-2,resid_mlp:1")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "term_costs"))
    args = parser.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        for label, losses in loss_sets(IMP[name]).items():
            row = run_in_subprocess(name, args.steps, {"losses": losses})
            row["loss_set"] = label
            print(f"{name} | {label}: {1e3 * row['s_per_step']:.1f} ms/step", flush=True)
            rows.append(row)
    write_results(pathlib.Path(args.out), rows, to_markdown)


if __name__ == "__main__":
    main()
