"""Which part of the seed decides whether a TMS run finds one subcomponent per feature?

    python -m benchmarks.reproduce.tms_seed_probe --variant=5-2 --pairs=2:2,2:0,0:2 \
        --probe_steps=8000

A run's seed feeds independent streams: ``init`` (components and CI functions) and ``train``
(data and masks). Each ``init:train`` pair (or ``components:ci:train`` triple, which takes the
component factors and the CI functions from different init seeds) is trained for
``--probe_steps`` steps (the lr schedule still spans ``config.steps``) and then probed on one-hot
inputs: how many
distinct subcomponents carry the features of ``linear1`` (argmax of the upper-leaky CI; 5 of 5 is
the paper's solution), the identity-CI error count, MMCS and the subcomponents with norm > 0.1,
and the mean total loss over each tenth of the probe (``loss_blocks``): whether the training loss
alone tells a bad init apart early (the question behind ``spdjax/training/init_selection.py``).
Results go to ``benchmarks/results/tms_seed_probe_<variant><tag>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from benchmarks.reproduce.tms_table1 import ROOT
import spdjax
from spdjax.config import files as configs
from spdjax.analysis import ci_patterns, metrics
from spdjax.families.tms import model as tms
from spdjax.training import loop


def probe(run: loop.Run, comp_seed: int, ci_seed: int, train_seed: int, steps: int) -> dict:
    """Trains ``run`` from the mixed seeds for ``steps`` steps (of its ``config.steps``
    schedule) and probes the result; the run's compiled step is reused across probes."""
    exp, decomp = run.experiment, run.method.decomposition
    # The key streams of spdjax.training.loop.RunKeys, each from its own seed.
    params = run.method.init(loop.RunKeys.from_seed(comp_seed).init, exp.target_params)
    params["ci"] = run.method.init(loop.RunKeys.from_seed(ci_seed).init, exp.target_params)["ci"]
    run.state = loop.state_from_params(run, params)
    run.keys = dataclasses.replace(run.keys, train=loop.RunKeys.from_seed(train_seed).train)
    block = max(1, steps // 10)
    sums = {"blocks": [], "total": 0.0}

    def on_step(step, m):
        sums["total"] = sums["total"] + m["loss"]["total"]  # summed on device
        if step % block == 0:
            sums["blocks"].append(sums["total"])
            sums["total"] = 0.0

    t0 = time.perf_counter()
    loop.train(run, steps, on_step=on_step)
    params = jax.device_get(run.params)
    n_features = exp.target_params["linear1"]["kernel"].shape[0]
    ci = metrics.one_hot_ci(decomp, params, exp.target_params, n_features)
    W = np.asarray(exp.target_params["linear1"]["kernel"])
    V, U = (np.asarray(a) for a in decomp.factors(params, "linear1"))
    feature_sites = [n for n, r in tms.site_roles(exp.model_config).items() if r == "features"]
    out = {
        "comp_seed": comp_seed, "ci_seed": ci_seed, "train_seed": train_seed, "steps": steps,
        "distinct_carriers": {n: len(set(np.argmax(ci[n].upper, axis=1))) for n in feature_sites},
        "identity_ci_errors": {n: int(ci_patterns.identity_ci_error(ci[n].lower))
                               for n in feature_sites},
        "mmcs": float(metrics.mmcs_ml2r(W, V, U)["mmcs"]),
        "norm_above_0.1": int(np.sum(metrics.subcomponent_norms(V, U) > 0.1)),
        "loss_block_steps": block,
        "loss_blocks": [float(b) / block for b in sums["blocks"]],
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out), flush=True)
    return out


def parse_seeds(item: str) -> tuple[int, int, int]:
    """``"init:train"`` or ``"components:ci:train"`` -> ``(components, ci, train)`` seeds."""
    try:
        seeds = [int(s) for s in item.split(":")]
    except ValueError:
        seeds = []
    if len(seeds) not in (2, 3):
        raise ValueError(f"--pairs entry {item!r}: expected init:train or components:ci:train "
                         "with integer seeds, e.g. 2:0 or 2:0:0.")
    if len(seeds) == 2:
        seeds.insert(1, seeds[0])
    return tuple(seeds)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="5-2")
    parser.add_argument("--pairs", default="0:0,2:2,2:0,0:2",
                        help="comma-separated init:train pairs or comp:ci:train triples")
    parser.add_argument("--probe_steps", type=int, default=8000)
    parser.add_argument("--set", action="append", default=[],
                        help="config override key=value (python literal), e.g. --set=lr=2e-3")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--target_double_update", action="store_true",
                        help="train the target with the reference's two Adam updates of tied W")
    args = parser.parse_args(argv)
    runs = [parse_seeds(item) for item in args.pairs.split(",")]
    config = configs.load(f"tms:{args.variant}", configs.parse_assignments(args.set))
    if args.target_double_update:
        tms.TMS_VARIANTS[args.variant] = dataclasses.replace(
            tms.TMS_VARIANTS[args.variant], double_update=True)
    run = spdjax.setup(config)
    results = [probe(run, *seeds, args.probe_steps) for seeds in runs]
    path = ROOT / "benchmarks" / "results" / f"tms_seed_probe_{args.variant}{args.tag}.json"
    path.write_text(json.dumps({"overrides": args.set,
                                "target_double_update": args.target_double_update,
                                "results": results}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
