"""Which part of the seed decides whether a TMS run finds one subcomponent per feature?

    python -m benchmarks.tms_seed_probe --variant=5-2 --pairs=2:2,2:0,0:2 --probe_steps=8000

A run's seed feeds independent streams: ``init`` (components and CI functions) and ``train``
(data and masks). Each ``init:train`` pair (or ``components:ci:train`` triple, which takes the
component factors and the CI functions from different init seeds) is trained for
``--probe_steps`` steps (the lr schedule still spans ``config.steps``) and then probed on one-hot
inputs: how many
distinct subcomponents carry the features of ``linear1`` (argmax of the upper-leaky CI; 5 of 5 is
the paper's solution), the identity-CI error count, MMCS and the subcomponents with norm > 0.1,
and the mean total loss over each tenth of the probe (``loss_blocks``): whether the training loss
alone tells a bad init apart early (the question behind ``spdjax/init_selection.py``).
Results go to ``benchmarks/results/tms_seed_probe_<variant><tag>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from benchmarks.tms_table1 import ROOT, apply_overrides, load_config
from spdjax import evaluation, tms
from spdjax.experiment import build_experiment
from spdjax.schedules import make_schedule
from spdjax.step import init_train_state, make_optimizer, make_train_step, spd_objective
from spdjax.train import init_params, run_keys


def probe(config, exp, comp_seed: int, ci_seed: int, train_seed: int, steps: int) -> dict:
    decomp = exp.decomposition
    schedule = make_schedule(config.lr_schedule, config.lr, config.steps,
                             warmup_frac=config.lr_warmup_frac, final_frac=config.lr_final_frac)
    objective = spd_objective(decomp, config.losses.to_dict(), l0_threshold=config.l0_threshold)
    optimizer = make_optimizer(decomp, schedule)

    # The key streams of spdjax.train.train_and_evaluate, each from its own seed.
    params = init_params(config, exp, run_keys(comp_seed)[0])
    params["ci"] = init_params(config, exp, run_keys(ci_seed)[0])["ci"]
    k_train = run_keys(train_seed)[1]
    state = init_train_state(params, optimizer)
    step_fn = make_train_step(objective, optimizer, exp.batch_fn, total_steps=config.steps,
                              microbatches=config.microbatches)
    t0 = time.perf_counter()
    block = max(1, steps // 10)
    block_sums, total = [], 0.0
    for i in range(1, steps + 1):
        state, metrics = step_fn(state, exp.target_params, k_train)
        total = total + metrics["loss/total"]  # summed on device
        if i % block == 0:
            block_sums.append(total)
            total = 0.0
    params = jax.device_get(state.params)
    n_features = exp.target_params["linear1"]["kernel"].shape[0]
    ci = evaluation.one_hot_ci(decomp, params, exp.target_params, n_features)
    W = np.asarray(exp.target_params["linear1"]["kernel"])
    V, U = (np.asarray(a) for a in decomp.factors(params, "linear1"))
    out = {
        "comp_seed": comp_seed, "ci_seed": ci_seed, "train_seed": train_seed, "steps": steps,
        "distinct_carriers": {n: len(set(np.argmax(c.upper, axis=1))) for n, c in ci.items()
                              if n.startswith("linear")},
        "identity_ci_errors": {n: int(evaluation.identity_ci_error(c.lower)) for n, c in ci.items()
                               if n.startswith("linear")},
        "mmcs": float(evaluation.mmcs_ml2r(W, V, U)["mmcs"]),
        "norm_above_0.1": int(np.sum(evaluation.subcomponent_norms(V, U) > 0.1)),
        "loss_block_steps": block,
        "loss_blocks": [float(b) / block for b in block_sums],
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
    config = load_config(args.variant)
    if args.target_double_update:
        tms.TMS_VARIANTS[args.variant] = dataclasses.replace(
            tms.TMS_VARIANTS[args.variant], double_update=True)
    apply_overrides(config, args.set)
    runs = [parse_seeds(item) for item in args.pairs.split(",")]
    exp = build_experiment(config)
    results = [probe(config, exp, *seeds, args.probe_steps) for seeds in runs]
    path = ROOT / "benchmarks" / "results" / f"tms_seed_probe_{args.variant}{args.tag}.json"
    path.write_text(json.dumps({"overrides": args.set,
                                "target_double_update": args.target_double_update,
                                "results": results}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
