"""ResidMLP over seeds: on how many does SPD find the paper's solution?

    python -m benchmarks.reproduce.resid_mlp_seeds --variant=1 --seeds=0,1,2,3,4
    python -m benchmarks.reproduce.resid_mlp_seeds --variant=2 --seeds=0,1 --steps=5000

Each seed is one CLI-equivalent run in ``<root>/<row>_seed<seed>`` (it resumes if interrupted and
is read back once its ``summary.json`` exists), and after every run its numbers are merged into
``benchmarks/results/resid_mlp_seeds.{json,md}``, so a session that stops loses nothing and the
next one continues with the seeds still missing. Rows are ``<variant>`` for the full recipe and
``<variant>@<steps>`` for a shortened one.

A seed *finds the solution* when, as in the paper's 1-layer result: every ``mlp_in`` has 0
identity CI errors (one subcomponent per feature), every ``mlp_out`` has 0 dense CI errors and
exactly ``d_mlp`` alive subcomponents (one dense block of the MLP's width), and the neuron
contributions of the chosen subcomponents correlate with the target's at r >= 0.99.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from spdjax.config import files as configs
from spdjax.training.family import FAMILIES
from spdjax.config.runs import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[2]
MIN_R = 0.99


def verdict(summary: dict, d_mlp: int) -> dict:
    """The solution criteria of one run's ``summary.json``: each check and ``solved``."""
    per_site = summary["ci_errors"]["per_site"]
    checks = {
        "identity_errors": sum(v for k, v in per_site.items() if k.endswith("mlp_in")),
        "dense_errors": sum(v for k, v in per_site.items() if k.endswith("mlp_out")),
        "alive_mlp_out": [v for k, v in sorted(summary["alive"].items()) if k.endswith("mlp_out")],
        "contribution_r": summary["contribution_r"]["all"],
    }
    checks["solved"] = (checks["identity_errors"] == 0 and checks["dense_errors"] == 0
                        and all(n == d_mlp for n in checks["alive_mlp_out"])
                        and checks["contribution_r"] >= MIN_R)
    return checks


def tabulate(table: dict) -> str:
    lines = ["| row | seed | steps | identity CI errors (mlp_in) | dense CI errors (mlp_out) "
             "| alive mlp_out per layer | contribution r | solution found | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, runs in sorted(table.items()):
        for r in sorted(runs, key=lambda r: r["seed"]):
            lines.append(f"| {row} | {r['seed']} | {r['steps']} | {r['identity_errors']} "
                         f"| {r['dense_errors']} | {r['alive_mlp_out']} "
                         f"| {r['contribution_r']:.5f} | {'yes' if r['solved'] else 'no'} "
                         f"| {r['wall_time_s'] / 60:.1f} |")
        solved = sum(r["solved"] for r in runs)
        lines.append(f"| **{row}** | | | | | | | **{solved} of {len(runs)}** | |")
    return "\n".join(lines) + "\n"


def save(out: pathlib.Path, row: str, record: dict) -> None:
    """Merges one run into ``out.json`` (as read now: other invocations may have written) and
    rewrites the table ``out.md``."""
    path = out.with_suffix(".json")
    table = json.loads(path.read_text()) if path.exists() else {}
    runs = [r for r in table.get(row, []) if r["seed"] != record["seed"]]
    table[row] = sorted(runs + [record], key=lambda r: r["seed"])
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(tabulate(table))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="1")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=None, help="shorten the recipe")
    parser.add_argument("--set", action="append", default=[],
                        help="other config override key=value, e.g. --set=eval_batch_size=2000")
    parser.add_argument("--root", default=str(ROOT / "workdir" / "resid_mlp_seeds"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "resid_mlp_seeds"))
    args = parser.parse_args(argv)
    overrides = configs.parse_assignments(list(args.set))
    if args.steps is not None:
        overrides["steps"] = args.steps
    row = args.variant + (f"@{args.steps}" if args.steps is not None else "")
    for seed in (int(s) for s in args.seeds.split(",")):
        config = configs.load(f"resid_mlp:{args.variant}", {**overrides, "seed": seed})
        d_mlp = FAMILIES.get("resid_mlp").model_config(config).d_mlp
        workdir = pathlib.Path(args.root) / f"{row}_seed{seed}"
        done = workdir / "summary.json"
        summary = json.loads(done.read_text()) if done.exists() else train_and_evaluate(
            config, workdir)
        record = {"seed": seed, "steps": summary["steps"], "overrides": args.set,
                  "wall_time_s": summary["wall_time_s"], **verdict(summary, d_mlp)}
        save(pathlib.Path(args.out), row, record)
        print(f"ResidMLP {row} seed {seed}: {record}", flush=True)
    print(tabulate(json.loads(pathlib.Path(args.out).with_suffix(".json").read_text())))


if __name__ == "__main__":
    main()
