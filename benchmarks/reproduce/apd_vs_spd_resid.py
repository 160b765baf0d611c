"""APD and SPD side by side on one ResidMLP target: a table row per method, the neuron
contributions of both next to the target's, and APD's scrubbed / anti-scrubbed ablations.

    python -m benchmarks.reproduce.apd_vs_spd_resid --spd=workdir/resid_mlp_seeds/1_seed0 \\
        --apd=workdir/apd_resid_mlp_1 --out=benchmarks/results/apd_vs_spd_resid_mlp_1

Per method: the neuron-contribution correlation with the target (pooled r), the contribution
norm ratio (each feature's chosen piece against the target, ResidMLP's ML2R: shrinkage shows
as a ratio below 1), how many distinct
components / subcomponents the features choose in ``W_in`` (the paper's 1-layer solution: one
per feature, 100), and for SPD its CI errors (identity on ``mlp_in``, dense on ``mlp_out``).
For APD, :mod:`spdjax.families.resid_mlp.scrubbing` on 2000 training inputs: the mean MSE
against the target of the top-k forward, of scrubbed and of anti-scrubbed ablations of half the
components (``--n_ablate``, default half of C), next to the monosemantic model's loss. Writes
``OUT.json``, ``OUT.md``, ``OUT_contributions.png`` and ``OUT_scrub.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np
from matplotlib.figure import Figure

import spdjax
from spdjax.analysis.plots import save_figure
from spdjax.families.resid_mlp import model, scrubbing
from spdjax.families.resid_mlp.evaluation import contributions
from spdjax.families.resid_mlp.plots import _neuron_strip


def contribution_norm_ratio(per_layer: dict) -> dict:
    """ResidMLP's ML2R: per feature and layer, the norm of the chosen piece's neuron contributions
    over the target's (below 1: the piece is shrunk). Mean, std and median over the (feature,
    layer) rows whose target norm is at least 1% of the largest (a near-zero row has no ratio)."""
    t = np.concatenate([np.asarray(c["target"]) for c in per_layer.values()])
    m = np.concatenate([np.asarray(c["spd"]) for c in per_layer.values()])
    t_norm, m_norm = np.linalg.norm(t, axis=1), np.linalg.norm(m, axis=1)
    keep = t_norm >= 0.01 * t_norm.max()
    ratio = m_norm[keep] / t_norm[keep]
    return {"mean": float(ratio.mean()), "std": float(ratio.std()),
            "median": float(np.median(ratio)), "n": int(keep.sum())}


def method_row(run) -> dict:
    ev = run.evaluate()
    chosen = ev["distinct_chosen_subcomponents"]
    per_layer = contributions(run.decomposition, run.params, run.target_params,
                              run.experiment.model_config)
    row = {"method": run.method.name.upper(), "workdir": str(run.workdir), "steps": run.step,
           "C": run.config.C, "contribution_r": ev["contribution_r"]["all"],
           "contribution_norm_ratio": contribution_norm_ratio(per_layer),
           "contribution_r_per_layer": [v for k, v in sorted(ev["contribution_r"].items())
                                        if k != "all"],
           "distinct_chosen_per_layer": [chosen[k] for k in sorted(chosen)]}
    if "ci_errors" in ev:
        row["ci_errors"] = ev["ci_errors"]
    return row


def plot_contributions(runs: dict, path: pathlib.Path, n_features: int = 10) -> pathlib.Path:
    """Per layer: the target's and each method's neuron contributions of the first
    ``n_features`` features (one strip each)."""
    first = next(iter(runs.values()))
    cfg = first.experiment.model_config
    per = {label: contributions(r.decomposition, r.params, r.target_params, cfg)
           for label, r in runs.items()}
    rows = 1 + len(runs)
    fig = Figure(figsize=(11, 3 * rows * cfg.n_layers), layout="constrained")
    axs = fig.subplots(rows * cfg.n_layers, 1, sharey=True)
    for layer in range(cfg.n_layers):
        top = axs[layer * rows:(layer + 1) * rows]
        target = next(iter(per.values()))[layer]["target"][:n_features]
        _neuron_strip(top[0], target, [str(i) for i in range(n_features)], 2)
        top[0].set_title(f"Target model: neuron contributions of features 0-{n_features - 1} "
                         f"(layer {layer})")
        for ax, (label, c) in zip(top[1:], per.items()):
            c = c[layer]
            _neuron_strip(ax, c["spd"][:n_features],
                          [str(int(i)) for i in c["chosen"][:n_features]], 2)
            ax.set_title(f"{label}: each feature's chosen W_in (sub)component (layer {layer})")
    return save_figure(fig, path, 150)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spd", required=True, help="workdir of an SPD ResidMLP run")
    parser.add_argument("--apd", required=True, help="workdir of an APD run of the same target")
    parser.add_argument("--n_ablate", type=int, default=None, help="default: half of C")
    parser.add_argument("--n_examples", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results/apd_vs_spd_resid_mlp_1")
    args = parser.parse_args(argv)
    runs = {"SPD": spdjax.load(args.spd), "APD": spdjax.load(args.apd)}
    W = [np.asarray(r.target_params["layers_0"]["mlp_in"]["kernel"]) for r in runs.values()]
    if not np.array_equal(W[0], W[1]):
        raise ValueError("The runs decompose different targets; compare runs of one target.")
    out = pathlib.Path(args.out)
    rows = [method_row(r) for r in runs.values()]
    apd_run = runs["APD"]
    cfg = apd_run.experiment.model_config
    losses = scrubbing.scrub_losses(
        apd_run.decomposition, apd_run.params, apd_run.target_params, cfg, jax.random.key(0),
        topk=apd_run.config.apd.topk, n_ablate=args.n_ablate, n_examples=args.n_examples,
        attribution=apd_run.config.apd.attribution)
    n_ablate = apd_run.config.C // 2 if args.n_ablate is None else args.n_ablate
    baseline = float(model.naive_baseline_loss(cfg, apd_run.target_params["W_E"],
                                               key=jax.random.key(1)))
    rows[1]["scrub_mean_mse"] = {k: float(v.mean()) for k, v in losses.items()}
    result = {"rows": rows, "monosemantic_baseline_loss": baseline, "n_ablate": n_ablate,
              "n_examples": int(losses["topk"].size)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = ["| method | steps | C | contribution r (per layer) | contribution norm ratio "
          "(mean ± std; median) | distinct W_in choices per layer | CI errors (SPD) "
          "| top-k MSE | scrubbed MSE | anti-scrubbed MSE |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("scrub_mean_mse", {})
        fmt = {k: f"{v:.2e}" for k, v in s.items()}
        ci = r.get("ci_errors")
        per_layer = ", ".join(f"{v:.4f}" for v in r["contribution_r_per_layer"])
        nr = r["contribution_norm_ratio"]
        md.append(f"| {r['method']} | {r['steps']} | {r['C']} | {r['contribution_r']:.4f} "
                  f"({per_layer}) | {nr['mean']:.3f} ± {nr['std']:.3f}; {nr['median']:.3f} "
                  f"| {', '.join(map(str, r['distinct_chosen_per_layer']))} "
                  f"| {'' if ci is None else ci['total']} "
                  f"| {fmt.get('topk', '')} | {fmt.get('scrubbed', '')} "
                  f"| {fmt.get('anti_scrubbed', '')} |")
    md.append(f"\nMSEs against the target's output, means over {losses['topk'].size} training "
              f"inputs with an active feature; ablations of {n_ablate} of {apd_run.config.C} "
              f"components. The monosemantic model's loss (against the labels, all inputs): "
              f"{baseline:.2e}.")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(plot_contributions(runs, out.with_name(out.name + "_contributions.png")))
    print(scrubbing.plot_scrub_histogram(losses, out.with_name(out.name + "_scrub.png"),
                                         baseline=baseline))


if __name__ == "__main__":
    main()
