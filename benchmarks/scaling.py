"""Scaling curves of the SPD train step: time per step vs batch size, C, mask samples S, and sites.

    python -m benchmarks.scaling                 # all four sweeps (~10 min on 2 CPU cores)
    python -m benchmarks.scaling --sweeps=batch,C --steps=100

Each point is one :func:`benchmarks.run.measure` in a fresh process (compile excluded). Sweeps:

* ``batch``: TMS 5-2, batch 512 ... 8192;
* ``C``: TMS 40-10 (two tied sites, no micro-batching), C = 25 ... 400, batch 1024;
* ``S``: TMS 5-2, mask samples per reconstruction loss 1 ... 8 (both stochastic terms);
* ``sites``: ResidMLP with 1, 2, 3 layers (2, 4, 6 sites) at the same C = 100 and batch 512.

Writes ``benchmarks/results/scaling.{json,png}``; the PNG has one panel per sweep (log-log, with
a line of slope 1 for reference).
"""

from __future__ import annotations

import argparse
import json
import pathlib

from benchmarks.run import ROOT, machine, run_in_subprocess

# sweep -> (config, overridden key, values, fixed overrides, x-axis label)
SWEEPS = {
    "batch": ("tms:5-2", "batch_size", [512, 1024, 2048, 4096, 8192], {}, "batch size"),
    "C": ("tms:40-10", "C", [25, 50, 100, 200, 400], {"batch_size": 1024, "microbatches": 1},
          "C (subcomponents per site)"),
    "S": ("tms:5-2", "n_samples", [1, 2, 4, 8], {}, "mask samples S"),
    # target_steps: a briefly trained target (the step time does not depend on its quality).
    "sites": ("resid_mlp:{}", "layers", [1, 2, 3],
              {"C": 100, "batch_size": 512, "target_steps": 200},
              "decomposed sites (2 per layer)"),
}


def point(sweep: str, value, steps: int) -> dict:
    config, key, _, fixed, _ = SWEEPS[sweep]
    overrides = dict(fixed)
    if key == "n_samples":
        overrides.update({f"losses.{t}.n_samples": value
                          for t in ("stochastic_recon", "stochastic_recon_layerwise")})
    elif key == "layers":
        config = config.format(value)
        if value == 3:  # keep the CI width of the other variants: only the site count changes
            overrides["ci_hidden"] = (16,)
    else:
        overrides[key] = value
    row = run_in_subprocess(config, steps, overrides)
    x = 2 * value if key == "layers" else value
    return {"sweep": sweep, "x": x, **row}


def plot(results: dict[str, list[dict]], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(4 * len(results), 3.6), layout="constrained")
    axs = fig.subplots(1, len(results), squeeze=False)[0]
    for ax, (sweep, rows) in zip(axs, results.items()):
        xs = [r["x"] for r in rows]
        ms = [1e3 * r["s_per_step"] for r in rows]
        ax.loglog(xs, ms, "o-", label="measured")
        ax.loglog(xs, [ms[0] * x / xs[0] for x in xs], "--", color="grey", label="∝ x")
        ax.set_xlabel(SWEEPS[sweep][4])
        ax.set_ylabel("ms / step")
        ax.set_title(f"{SWEEPS[sweep][0].format('n')}: {sweep}")
        ax.set_xticks(xs, [str(x) for x in xs], minor=False)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=130)


def replot(path: pathlib.Path) -> None:
    """Redraws ``<path>.png`` from ``<path>.json`` (``--replot``), without measuring again."""
    plot(json.loads(path.with_suffix(".json").read_text())["results"], path.with_suffix(".png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default=",".join(SWEEPS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"))
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    args = parser.parse_args()
    if args.replot:
        return replot(pathlib.Path(args.out))
    results = {}
    for sweep in args.sweeps.split(","):
        if sweep not in SWEEPS:
            raise SystemExit(f"Unknown sweep {sweep!r}; expected some of {sorted(SWEEPS)}.")
        results[sweep] = []
        for value in SWEEPS[sweep][2]:
            row = point(sweep, value, args.steps)
            print(f"{sweep}={row['x']}: {1e3 * row['s_per_step']:.1f} ms/step", flush=True)
            results[sweep].append(row)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"Wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
