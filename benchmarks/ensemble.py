"""N seeds as one vmapped program (``--config.ensemble=N``) against N runs one after another.

    python -m benchmarks.ensemble                          # TMS 5-2, 5 seeds, 300 timed steps
    python -m benchmarks.ensemble --config=resid_mlp:1 --members=5 --steps=50

Both sides are the real training loop in memory (``loop.train`` / ``ensemble.train``: steps,
metric lines, health checks), timed after a 10-step warm-up that holds the compilation (reported
apart). Results go to ``benchmarks/results/ensemble_<config>.{json,md}``.
"""

from __future__ import annotations

import argparse
import pathlib
import time

from benchmarks.run import ROOT, write_results
import spdjax

WARM = 10


def timed(name: str, steps: int, overrides: dict) -> tuple[float, float]:
    """(s/step after the warm-up, warm-up s incl. compilation) of ``name`` with ``overrides``: a
    single run, or an ensemble when they ask for one."""
    from spdjax.config import files as configs
    from spdjax.training import ensemble, loop

    config = configs.load(name, {**overrides, "steps": WARM + steps, "log_every": WARM,
                                 "figures": False})
    is_ensemble = config.ensemble > 1
    run = spdjax.setup_ensemble(config) if is_ensemble else spdjax.setup(config)
    train = ensemble.train if is_ensemble else loop.train
    t = time.perf_counter()
    train(run, WARM)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    train(run)
    return (time.perf_counter() - t) / steps, compile_s


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['device']}, {info['cpu_count']} cores; jax {info['jax']}; commit "
             f"{info['commit']}; {info['date']}", "",
             "| config | mode | members | one program: ms/step (all members) "
             "| one after another: ms/step (sum of members) | speed-up "
             "| compile s (program / each run) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['mode']} | {r['members']} "
                     f"| {1e3 * r['ensemble_s_per_step']:.1f} "
                     f"| {1e3 * r['sequential_s_per_step']:.1f} | {r['speedup']:.2f}x "
                     f"| {r['ensemble_compile_s']:.1f} / {r['single_compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tms:5-2")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    singles = [timed(args.config, args.steps, {"seed": seed}) for seed in range(args.members)]
    seq_s = sum(s for s, _ in singles)
    rows = []
    for mode in ("vmap", "map"):
        ens_s, ens_compile = timed(args.config, args.steps,
                                   {"ensemble": args.members, "ensemble_mode": mode})
        rows.append({"config": args.config, "mode": mode, "members": args.members,
                     "steps": args.steps, "ensemble_s_per_step": ens_s,
                     "sequential_s_per_step": seq_s, "speedup": seq_s / ens_s,
                     "ensemble_compile_s": ens_compile,
                     "single_compile_s": sum(c for _, c in singles) / len(singles)})
    out = args.out or ROOT / "benchmarks" / "results" / f"ensemble_{args.config.replace(':', '_')}"
    write_results(pathlib.Path(out), rows, to_markdown)


if __name__ == "__main__":
    main()
