"""A finished language-model decomposition as VPD reports one, in markdown:

    python -m benchmarks.reproduce.lm_report --workdir=workdir/llama_2x128 --name=lm_llama_2x128

From the run's ``summary.json`` (its final evaluation; run it with ``--config.eval_suite=True``
for the PGD ladder, L0 per layer and alive counts): CE and KL under every masking with the
fraction of CE recovered against zero ablation (Bushnaq et al. 2026, *Interpreting Language
Model Parameters*, the table of its decomposed LM), the PGD ladder, L0 per layer and per site
and alive counts. From the run's harvest (``python -m spdjax.harvest --workdir=...``), if there
is one: per site (so per layer too), its most used subcomponents (highest firing density), each
with the tokens it fires on most (share of its firings) and sampled contexts, the firing token in
``[[ ]]``.

Writes ``benchmarks/results/<name>_report.md`` and copies the summary to
``<name>_summary.json``; prints the report.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
from typing import Callable, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
# VPD's order: from the least to the most ablated model
MASKINGS = ("unmasked", "unmasked_delta", "stochastic", "stochastic_delta", "rounded_0",
            "rounded_0.1", "ci_masked", "rounded_0.5", "random", "zero")
PER_SITE = 2  # most used subcomponents listed per site
CONTEXTS = 3  # sampled contexts shown per subcomponent


def layer_of(site: str) -> str:
    """``blocks_0/attn/q`` -> ``blocks_0`` (the suite's grouping of sites into layers)."""
    return site.split("/", 1)[0]


def masking_table(summary: dict) -> list[str]:
    """CE, KL and CE recovered per masking, the target first."""
    if "ce_target" not in summary:
        raise ValueError("The summary has no ce_target: not a language model's evaluation "
                         f"(keys: {sorted(summary)[:12]}...).")
    rec = summary.get("ce_recovered", {})
    lines = ["| masking | CE | KL(target ‖ model) | CE recovered |", "|---|---:|---:|---:|",
             f"| target | {summary['ce_target']:.4f} | 0 | 100% |"]
    for m in MASKINGS:
        if f"ce_{m}" in summary:
            r = f"{rec[m]:.1%}" if m in rec else ""
            lines.append(f"| {m} | {summary[f'ce_{m}']:.4f} | {summary[f'kl_{m}']:.4f} | {r} |")
    return lines


def suite_tables(suite: dict) -> list[str]:
    """The PGD ladder, L0 per layer and per site, alive counts (the ``suite`` block)."""
    out = []
    if suite.get("pgd"):
        steps = sorted(suite["pgd"], key=int)
        out += ["| PGD steps (sources shared across the batch) | " + " | ".join(steps) + " |",
                "|---|" + "---:|" * len(steps),
                f"| {suite['divergence']} to the target | "
                + " | ".join(f"{suite['pgd'][s]:.4g}" for s in steps) + " |", "",
                f"For scale: stochastic masks {suite['loss']['stochastic']:.4g}, zero ablation "
                f"{suite['loss']['zero']:.4g}.", ""]
    layers = suite["l0_per_layer"]
    out += [f"L0 (CI > {suite['l0_threshold']}) per token: {suite['l0_total']:.1f} over all "
            "sites; per layer " + ", ".join(f"{k} {v:.1f}" for k, v in layers.items()) + ". "
            f"Alive (mean CI > {suite['alive_mean_ci_threshold']:g}): "
            f"{suite['alive_mean_ci_total']} of {sum(len(v) for v in suite['mean_ci'].values())}.",
            "", "| site | L0 per token | alive (mean CI) | ever above the L0 threshold | C |",
            "|---|---:|---:|---:|---:|"]
    for site, l0 in suite["l0"].items():
        out.append(f"| {site} | {l0:.2f} | {suite['alive_mean_ci'][site]} | "
                   f"{suite['alive_threshold'][site]} | {len(suite['mean_ci'][site])} |")
    return out


def _context(e: dict, window: int, decode: Callable[[Sequence[int]], str]) -> str:
    tokens = e["tokens"]
    text = decode([t for t in tokens[:window] if t >= 0])
    text += f"[[{decode([tokens[window]])}]]"
    text += decode([t for t in tokens[window + 1:] if t >= 0])
    return " ".join(text.split())  # one line


def most_used(h, decode: Callable[[Sequence[int]], str], per_site: int = PER_SITE,
              contexts: int = CONTEXTS) -> list[str]:
    """Per site, its ``per_site`` densest subcomponents: density, mean CI, the tokens each
    fires on most (share of its firings) and sampled contexts; sites under their layer."""
    out = [f"Harvest: {h.n} tokens, firing at CI > {h.spec.threshold}.", ""]
    precision = h.token_stats("input")["precision"]
    layer = None
    sites = sorted(zip(h.spec.sites, h.spec.sizes), key=lambda s: layer_of(s[0]))  # stable
    for site, size in sites:
        if layer_of(site) != layer:
            layer = layer_of(site)
            out += [f"**{layer}**", ""]
        idx = [h.index((site, c)) for c in range(size)]
        for i in sorted(idx, key=lambda i: -h.density[i])[:per_site]:
            if h.count[i] == 0:
                break
            top = np.argsort(-precision[i], kind="stable")[:5]
            tokens = ", ".join(f"`{decode([int(t)])!r}` {precision[i, t]:.0%}" for t in top
                               if precision[i, t] > 0)
            out.append(f"- `{h.names[i]}`: fires on {h.density[i]:.1%} of tokens, mean CI "
                       f"{h.mean_ci[i]:.3f}; on {tokens}")
            for e in sorted(h.examples(h.names[i]), key=lambda e: -e["ci"])[:contexts]:
                out.append(f"  - CI {e['ci']:.2f}: `{_context(e, h.spec.window, decode)}`")
    out.append("")
    return out


def report(workdir: pathlib.Path, name: str) -> str:
    summary = json.loads((workdir / "summary.json").read_text())
    lines = [f"# {name}: `{workdir}` after {summary.get('steps')} steps", ""]
    lines += masking_table(summary) + [""]
    if "suite" in summary:
        lines += suite_tables(summary["suite"]) + [""]
    if (workdir / "analysis" / "harvest" / "harvest.npz").exists():
        import spdjax
        from spdjax.analysis.harvest import load_harvest
        from spdjax.families.lm import harvest_page

        run = spdjax.load(workdir)
        lines += most_used(load_harvest(workdir),
                           harvest_page.decoder(run.experiment.model_config))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--name", required=True, help="file stem under benchmarks/results")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if not (args.workdir / "summary.json").exists():
        parser.error(f"{args.workdir} has no summary.json: the run has not finished (resume it "
                     "with python -m spdjax.main --workdir=... to evaluate it).")
    text = report(args.workdir, args.name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}_report.md").write_text(text + "\n")
    shutil.copyfile(args.workdir / "summary.json", args.out / f"{args.name}_summary.json")
    print(text)


if __name__ == "__main__":
    main()
