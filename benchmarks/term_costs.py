"""What each training term costs: step time of TMS 5-2 and ResidMLP 1 with different loss sets,
VPD's terms, CI functions and Muon among them.

    python -m benchmarks.term_costs                     # -> benchmarks/results/term_costs.{json,md}
    python -m benchmarks.term_costs --configs=tms:5-2 --steps=100
    python -m benchmarks.term_costs --only-vpd --out=benchmarks/results/term_costs_vpd
    python -m benchmarks.term_costs --configs=lm:ih --steps=30 \
        --out=benchmarks/results/term_costs_ci_lm       # the CI functions on the induction toy
    python -m benchmarks.term_costs --only-vpd --match=paper,ci_fn \
        --out=benchmarks/results/term_costs_ci_toys     # only the rows whose label has one

Each loss set is timed by ``benchmarks.run`` (the real jitted train step, compile excluded, in a
fresh process). PGD multiplies the forward and backward passes by its ``n_steps``, so it is
measured against ``n_steps``; the ratio column is the step time over the paper recipe's. A
language-model config (``lm:<variant>``) gets the CI-function rows only, each on the config's own
loss set: per-site MLPs, one global MLP, the global transformer and the chunkwise one.
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
        "persistent_pgd_recon": {"coeff": 1.0, "n_warmup_steps": 2, "delta": True}}
    return sets


# VPD's terms (spdjax/config/vpd.py; docs/guides/vpd.md), each added to the paper recipe or
# replacing its part; the run's batch size for the per-example source scope.
BATCH = {"tms:5-2": 4096, "resid_mlp:1": 2048}
UNITS = {"tms:5-2": {"linear2": "output"},  # linear2's outputs feed the ReLU
         "resid_mlp:1": {"layers_0/mlp_in": "output", "layers_0/mlp_out": "input"}}


def vpd_sets(name: str, imp: dict) -> dict[str, tuple[dict, dict]]:
    """Label -> (loss config, other overrides): VPD's terms, CI functions and Muon."""
    sr = {"coeff": 1.0, "n_samples": 1}
    paper = {"faithfulness": {"coeff": 1.0}, "stochastic_recon": sr,
             "stochastic_recon_layerwise": sr, "importance_minimality": imp}
    gamma = {"gamma": 1.0, "gamma_anneal_start_frac": 0.0, "gamma_anneal_final_gamma": 0.01}
    smooth = {"coeff": imp["coeff"], **gamma}
    nested = {"coeff": imp["coeff"] / 2, "reference_datapoint_count": 32768, **gamma}
    merged = {"coeff": 1.0, "adv_fraction": 0.5, "n_warmup_steps": 2, "router": "uniform_k",
              "scope": "per_batch_per_position", "batch_shape": [BATCH[name]]}
    one = {"microbatches": 1}  # batch-coupled terms take the whole batch
    paper_minus_imp = {k: v for k, v in paper.items() if k != "importance_minimality"}
    sets = {
        "paper (faith + SR + SRL + imp)": (paper, {}),
        "smooth-L0 importance (replaces imp)": (
            {**paper_minus_imp, "smooth_l0_importance_minimality": smooth}, {}),
        "+ nested frequency": (
            {**paper_minus_imp, "smooth_l0_importance_minimality": smooth,
             "nested_frequency_minimality": nested}, one),
        "+ nested frequency with an EMA (state)": (
            {**paper_minus_imp, "smooth_l0_importance_minimality": smooth,
             "nested_frequency_minimality_ema": {**nested, "ema_halflife_steps": 200}}, one),
        "+ nonlinearity locality": (
            {**paper, "nonlinearity_locality": {"coeff": 3e-5, "units": UNITS[name],
                                                "relative_threshold": 8.0}}, {}),
        "+ delta_l2 (relative)": ({**paper, "delta_l2": {"coeff": 1.0,
                                                          "normalization": "relative"}}, {}),
        "merged stochastic-subset + PPGD (replaces SR + SRL)": (
            {"faithfulness": {"coeff": 1.0}, "importance_minimality": imp,
             "stochastic_pgd_recon_subset": merged}, one),
        "+ pooled PPGD, single source, pool 4 x batch": (
            {**paper, "persistent_pgd_recon": {
                "coeff": 1.0, "n_warmup_steps": 2, "pool_size": 4 * BATCH[name]}}, one),
        "VPD toy recipe (+vpd losses)": (
            {"faithfulness": {"coeff": 1.0}, "smooth_l0_importance_minimality": smooth,
             "nested_frequency_minimality": nested, "stochastic_pgd_recon_subset": merged}, one),
    }
    for ci_fn in ("shared_mlp", "global_mlp", "global_transformer"):
        sets[f"paper, ci_fn={ci_fn}"] = (paper, {"ci_fn": ci_fn, "ci_hidden": [64]})
    sets["paper, ci_fn=chunkwise_transformer, 1 site a chunk"] = (
        paper, {"ci_fn": "chunkwise_transformer", "ci_options.sites_per_chunk": 1})
    sets["paper, Muon on components and CI"] = (paper, {"optimizer.components.name": "muon",
                                                         "optimizer.ci.name": "muon"})
    return sets


def ci_sets() -> dict[str, tuple[None, dict]]:
    """Label -> (None: the config's own losses, overrides): each CI function on a sequence model
    (the transformers causal over positions, as spdjax/config/vpd.py sets them for LMs)."""
    causal = {"ci_options.causal": True}
    sets = {"ci_fn=mlp (per site, the config's)": (None, {"ci_fn": "mlp"}),
            "ci_fn=vector_mlp": (None, {"ci_fn": "vector_mlp"}),
            "ci_fn=global_mlp": (None, {"ci_fn": "global_mlp", "ci_hidden": [64]}),
            "ci_fn=global_transformer": (None, {"ci_fn": "global_transformer", **causal})}
    for per_chunk in (4, 1):
        sets[f"ci_fn=chunkwise_transformer, {per_chunk} site{'s' * (per_chunk > 1)} a chunk"] = (
            None, {"ci_fn": "chunkwise_transformer", "ci_options.sites_per_chunk": per_chunk,
                   **causal})
    return sets


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['device']}, {info['cpu_count']} cores; jax {info['jax']}; commit "
             f"{info['commit']}; {info['date']}", "",
             "| config | loss set | ms/step | x its config's first row | GFLOP/step |",
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
    parser.add_argument("--vpd", action=argparse.BooleanOptionalAction, default=True,
                        help="also VPD's terms, the global CI functions and Muon")
    parser.add_argument("--only-vpd", action="store_true",
                        help="only those (e.g. with --out=benchmarks/results/term_costs_vpd)")
    parser.add_argument("--match", default="",
                        help="comma-separated label fragments: only the rows whose label has one")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "term_costs"))
    args = parser.parse_args(argv)
    rows = []
    for name in args.configs.split(","):
        if name.startswith("lm:"):
            runs = ci_sets()
        elif name not in IMP:
            raise SystemExit(f"--configs: no loss sets for {name!r}; expected one of "
                             f"{sorted(IMP)} or an lm:<variant>.")
        else:
            runs = {} if args.only_vpd else {
                label: (losses, {}) for label, losses in loss_sets(IMP[name]).items()}
        # (VPD's paper row again only where it is the baseline)
        if (args.vpd or args.only_vpd) and name in IMP:
            runs.update({k: v for k, v in vpd_sets(name, IMP[name]).items()
                         if k not in runs})
        if args.match:
            runs = {k: v for k, v in runs.items()
                    if any(m in k for m in args.match.split(","))}
        for label, (losses, overrides) in runs.items():
            own = {} if losses is None else {"losses": losses}  # None: the config's own
            row = run_in_subprocess(name, args.steps, {**own, **overrides})
            row["loss_set"] = label
            print(f"{name} | {label}: {1e3 * row['s_per_step']:.1f} ms/step", flush=True)
            rows.append(row)
    write_results(pathlib.Path(args.out), rows, to_markdown)


if __name__ == "__main__":
    main()
