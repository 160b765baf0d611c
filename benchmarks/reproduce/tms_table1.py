"""Reproduce the SPD paper's Table 1 (TMS MMCS / ML2R) over several seeds, and tabulate it.

    python -m benchmarks.reproduce.tms_table1 --variants=5-2,5-2-id --seeds=0,1,2,3,4
    python -m benchmarks.reproduce.tms_table1 --variants=40-10 --seeds=0 --steps=40000
    python -m benchmarks.reproduce.tms_table1 --variants=5-2+gaussian  # a modifier (configs/tms.py)
    python -m benchmarks.reproduce.tms_table1 --variants=5-2 --tag=+lr2e-3 --set=lr=2e-3

A row's consecutive seeds are trained as one ensemble program (``config.ensemble``, each member
equal to its seed's run alone) in ``<root>/<variant>_seeds<first>-<last>``; ``--no-ensemble``
makes each (variant, seed) one ordinary CLI-equivalent run in ``<root>/<variant>_seed<seed>``.
Either resumes if interrupted and is skipped once its summaries exist. A run already recorded in the
results JSON (same row, seed, overrides and steps) is reused too, so a fresh checkout can add seeds
to a row without retraining the recorded ones; ``--rerun`` trains them again. The table is written
to ``benchmarks/results/tms_table1.{json,md}``: mean ± std over seeds, and per run the std over
features (the paper's "±"). ``--set key=value`` changes the recipe; such runs need a ``--tag``
(starting with ``+``), which names their rows and workdirs so they never mix with the paper
recipe's.

Each run records its target recipe (``config.target_recipe``); a recorded run is reused only
with the same recipe. Rows made before spdjax 0.3 (targets with one Adam update of the tied W
per step) are kept, renamed ``<row>+single-update-target``
(``--set=target_recipe.double_update=false`` selects that target recipe again).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

from spdjax.config import files as configs
from spdjax.config.runs import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAPER = {  # SPD paper Table 1: MMCS, ML2R (mean ± std over features)
    "5-2": ("1.000 ± 0.000", "0.993 ± 0.002"),
    "40-10": ("1.000 ± 0.000", "1.010 ± 0.007"),
    "5-2-id": ("1.000 ± 0.000", "0.992 ± 0.010"),
    "40-10-id": ("1.000 ± 0.000", "1.031 ± 0.001"),
}
APD_PAPER = {  # APD paper, TMS results table: MMCS, ML2R (mean ± std over features)
    "5-2": ("0.998 ± 0.000", "0.893 ± 0.004"),
    "40-10": ("0.996 ± 0.003", "0.935 ± 0.001"),
}


def paper_numbers(row: str) -> tuple[str, str]:
    """The published (MMCS, ML2R) of a row's model and method (``-`` where none)."""
    model = row.split("+")[0]
    table = APD_PAPER if "+apd" in row else PAPER
    return table.get(model, ("-", "-"))


def consecutive(seeds: list[int]) -> list[list[int]]:
    """``[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]``: the groups an ensemble can train together."""
    groups: list[list[int]] = []
    for s in seeds:
        if groups and s == groups[-1][-1] + 1:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def run_ensemble(variant: str, seeds: list[int], root: pathlib.Path, steps: int | None,
                 overrides: list[str] = (), tag: str = "") -> list[dict]:
    """Consecutive ``seeds`` as one ensemble program (``config.ensemble``) in
    ``<root>/<variant><tag>_seeds<first>-<last>`` (it resumes if interrupted); their summaries."""
    config = configs.load(f"tms:{variant}", configs.parse_assignments(list(overrides)))
    config.seed, config.ensemble = seeds[0], len(seeds)
    if steps is not None:
        config.steps = steps
    workdir = root / f"{variant}{tag}_seeds{seeds[0]}-{seeds[-1]}"
    done = [workdir / f"seed_{s}" / "summary.json" for s in seeds]
    if all(p.exists() for p in done):
        return [json.loads(p.read_text()) for p in done]
    return train_and_evaluate(config, workdir)


def run(variant: str, seed: int, root: pathlib.Path, steps: int | None,
        overrides: list[str] = (), tag: str = "") -> dict:
    config = configs.load(f"tms:{variant}", configs.parse_assignments(list(overrides)))
    config.seed = seed
    if steps is not None:
        config.steps = steps
    workdir = root / f"{variant}{tag}_seed{seed}"
    if (workdir / "summary.json").exists():
        return json.loads((workdir / "summary.json").read_text())
    return train_and_evaluate(config, workdir)


OLD_RECIPE = {"double_update": False}  # runs recorded before spdjax 0.3 name no recipe


def recorded_run(table: dict, row: str, seed: int, overrides: list[str],
                 steps: int | None, recipe: dict) -> dict | None:
    """The run of ``seed`` in ``table[row]`` if it was made with the same overrides, steps and
    target recipe."""
    for r in table.get(row, {}).get("runs", []):
        if (r["seed"] == seed and r.get("overrides", []) == list(overrides)
                and (steps is None or r["steps"] == steps)
                and r.get("target_recipe", OLD_RECIPE) == recipe):
            return r
    return None


def found(run: dict) -> bool:
    """The run found the ground truth: MMCS >= 0.999 and no CI errors at tol 0.1 (APD, which
    has no CI, by its MMCS alone)."""
    return run["mmcs"] >= 0.999 and run.get("ci_errors", {}).get("total", 0) == 0


def _l0(runs: list[dict], key: str) -> str:
    """Mean over seeds of a CI-L0 of ``linear1`` (``-`` if a run did not record it)."""
    values = [r[key]["linear1"] for r in runs if isinstance(r.get(key), dict)]
    return f"{statistics.mean(values):.2f}" if len(values) == len(runs) else "-"


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def tabulate(results: dict[str, list[dict]]) -> tuple[dict, str]:
    table, lines = {}, [
        "| model | seeds | steps | MMCS (mean ± std over seeds) | ML2R (mean ± std over seeds) "
        "| ML2R std over features (per seed) | CI errors (tol 0.1, per seed) | ground truth found "
        "| CI-L0 linear1 at 0.1 / 0.01 | minutes/run | paper MMCS "
        "| paper ML2R (APD rows: APD paper) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, runs in results.items():
        mmcs, ml2r = _mean_std([r["mmcs"] for r in runs]), _mean_std([r["ml2r"] for r in runs])
        table[variant] = {
            "seeds": [r["seed"] for r in runs], "steps": runs[0]["steps"],
            "mmcs_mean": mmcs[0], "mmcs_std_seeds": mmcs[1],
            "ml2r_mean": ml2r[0], "ml2r_std_seeds": ml2r[1], "runs": runs,
        }
        feat_std = ", ".join(f"{r['ml2r_std']:.3f}" for r in runs)
        errors = ", ".join(str(r["ci_errors"]["total"]) if "ci_errors" in r else "-"
                           for r in runs)
        minutes = statistics.mean(r["wall_time_s"] for r in runs) / 60
        lines.append(
            f"| TMS {variant} | {len(runs)} | {runs[0]['steps']} | {mmcs[0]:.4f} ± {mmcs[1]:.4f} "
            f"| {ml2r[0]:.4f} ± {ml2r[1]:.4f} | {feat_std} | {errors} "
            f"| {sum(found(r) for r in runs)} of {len(runs)} "
            f"| {_l0(runs, 'ci_l0')} / {_l0(runs, 'ci_l0_at_0.01')} | {minutes:.1f} "
            f"| {paper_numbers(variant)[0]} | {paper_numbers(variant)[1]} |"
        )
    return table, "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="5-2,5-2-id")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--set", action="append", default=[],
                        help="config override key=value (JSON literal), e.g. --set=init=gaussian")
    parser.add_argument("--tag", default="",
                        help="row/workdir suffix for a changed recipe, e.g. +gaussian")
    parser.add_argument("--root", default=str(ROOT / "workdir" / "table1"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tms_table1"))
    parser.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=True,
                        help="train a row's consecutive seeds as one ensemble program "
                             "(--no-ensemble: one run per seed)")
    parser.add_argument("--rerun", action="store_true",
                        help="train seeds already recorded in the results JSON again")
    args = parser.parse_args(argv)
    if args.set and not args.tag.startswith("+"):
        parser.error("--set changes the recipe: also give --tag=+NAME to keep its rows apart.")
    root, out = pathlib.Path(args.root), pathlib.Path(args.out)
    json_path = out.with_suffix(".json")
    existing = json.loads(json_path.read_text()) if json_path.exists() else {}
    results = {}
    for variant in args.variants.split(","):
        row = variant + args.tag
        rows = results[row] = []
        recipe = configs.load(f"tms:{variant}", configs.parse_assignments(list(args.set)))
        recipe = configs.to_dict(recipe)["target_recipe"]
        to_train = []
        for seed in (int(s) for s in args.seeds.split(",")):
            recorded = recorded_run(existing, row, seed, args.set, args.steps, recipe)
            if (recorded and not args.rerun
                    and not (root / f"{row}_seed{seed}" / "summary.json").exists()):
                print(f"{row} seed {seed}: reusing the run recorded in {json_path} "
                      "(--rerun trains it again)", flush=True)
                rows.append(recorded)
            else:
                to_train.append(seed)
        groups = consecutive(to_train) if args.ensemble else [[s] for s in to_train]
        for group in groups:
            if len(group) == 1 or (root / f"{row}_seed{group[0]}" / "summary.json").exists():
                summaries = [run(variant, s, root, args.steps, args.set, args.tag) for s in group]
            else:  # the group's seeds as one program
                summaries = run_ensemble(variant, group, root, args.steps, args.set, args.tag)
            for seed, summary in zip(group, summaries):
                rows.append({"seed": seed, "overrides": args.set, "target_recipe": recipe,
                             **summary})
            rows.sort(key=lambda r: r["seed"])
            save(out, results)  # after every trained group: an interruption loses nothing
    save(out, results)
    print(tabulate(results)[1])


def _same_recipe(a: dict, b: dict) -> bool:
    return (a.get("overrides", []) == b.get("overrides", []) and a["steps"] == b["steps"]
            and a.get("target_recipe", OLD_RECIPE) == b.get("target_recipe", OLD_RECIPE))


def save(out: pathlib.Path, results: dict[str, list[dict]]) -> None:
    """Merges ``results`` into ``out.json`` as read now and rewrites it and the full table
    ``out.md``. Another invocation may have written meanwhile: its rows, and its runs of other
    seeds in the same rows (made with the same recipe), are kept, so seeds of one row can be
    trained by several processes at once (one seed each)."""
    json_path = out.with_suffix(".json")
    existing = json.loads(json_path.read_text()) if json_path.exists() else {}
    merged = {}
    for row, runs in results.items():
        if not runs:
            continue
        mine = {r["seed"] for r in runs}
        theirs = [r for r in existing.get(row, {}).get("runs", [])
                  if r["seed"] not in mine and _same_recipe(r, runs[0])]
        merged[row] = sorted(runs + theirs, key=lambda r: r["seed"])
    existing.update(tabulate(merged)[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(tabulate({v: t["runs"] for v, t in existing.items()})[1])


if __name__ == "__main__":
    main()
