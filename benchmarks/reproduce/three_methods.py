"""SPD, APD and L3D side by side on one target (TMS 5-2 of the ``tms`` family; ResidMLP 1 of
``resid_mlp``): what each finds against the ground truth, and what a training step of each costs.

    python -m benchmarks.reproduce.three_methods --seed=0 --workdir=workdir/three_methods \\
        --out=benchmarks/results        # -> three_methods_tms.{json,md,png}
    python -m benchmarks.reproduce.three_methods --model=resid-mlp-1 --l3d_steps=32000 \\
        --skip_costs --workdir=/tmp/l3d_resid_full --out=/tmp/l3d_resid_full/out   # trains L3D
    python -m benchmarks.reproduce.three_methods --model=resid-mlp-1 --l3d_steps=32000 \\
        --batch_sizes=32,256 --rounds=2 --workdir=/tmp/l3d_resid_full \\
        --out=benchmarks/results        # loads it; step costs -> three_methods_resid_mlp_1.*

Each method runs its own recipe on the same cached target (SPD ``configs/tms.py:5-2``: C 20, 40k
steps of 4096; APD ``configs/tms.py:5-2+apd``: C 5, 20k steps of 2048; L3D
``configs/l3d.py:5-2``: 5 subnetworks, 32k steps of 32 over a fixed set of 1000 samples). A
finished run in ``--workdir`` is loaded, not retrained. Ground truth, from each method's
``linear1`` slices ``P_c`` against the target's feature rows ``W_j`` (5 x 2):

* ``mmcs``: mean over features of the best cosine ``max_c cos(P_c[j], W_j)``; L3D's directions
  have an arbitrary sign, so for L3D ``max_c |cos|``;
* ``features_found``: features whose best cosine is at least :data:`FOUND_COS`, each with a
  component of its own;
* ``ml2r`` (SPD, APD; L3D's directions have no scale);
* each method's own fit measure: SPD's stochastic reconstruction loss and faithfulness, APD's
  top-k reconstruction MSE and faithfulness, L3D's relative gradient-reconstruction error.

ResidMLP 1 (``--model=resid-mlp-1``; -> ``three_methods_resid_mlp_1.{json,md,png}``): SPD's
and APD's runs (30k steps of 2048, 10k of 256) are too long for a shared 2-core CPU, so their
ground truth is read from ``benchmarks/results/apd_vs_spd_resid_mlp_1.json`` (the same
``target_seed`` 0 target: contribution r, distinct ``W_in`` choices); L3D
(``configs/l3d.py:resid-mlp-1``) is trained here for ``--l3d_steps`` steps and measured on the
one-hot inputs ``0.75 e_i`` (SPD's identity-CI probe): each feature's *chosen* subnetwork (the
largest impact ``|V_in[c] . g_i|``, averaged over references), how many distinct ones the 100
features choose, and for how many the chosen subnetwork's ``mlp_in`` direction reads mainly that
feature (its largest ``||W_E[i] P_c||``).

Cost: the jitted training step of each method at the same batch sizes (``--batch_sizes``), each
(method, batch size) in a fresh process, ``--rounds`` interleaved rounds (the median is
reported), with the 1-minute load average read before each. Compile time is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np
from matplotlib.figure import Figure

import spdjax
from benchmarks.run import machine, row_in_fresh_process
from spdjax.analysis.metrics import mmcs_ml2r_components
from spdjax.analysis.plots import save_figure
from spdjax.families.tms.plots import draw_vectors, feature_colors
from spdjax.training import loop

# model -> method -> its recipe (spdjax.config.load names)
MODELS = {
    "tms-5-2": {"SPD": "tms:5-2", "APD": "tms:5-2+apd", "L3D": "l3d:5-2"},
    "resid-mlp-1": {"SPD": "resid_mlp:1", "APD": "resid_mlp:1+apd", "L3D": "l3d:resid-mlp-1"},
}
METHODS = MODELS["tms-5-2"]
RESID_EARLIER = "benchmarks/results/apd_vs_spd_resid_mlp_1.json"  # SPD's and APD's runs
FOUND_COS = 0.99  # a feature is found when some component's cosine with it reaches this
TIMING_SECONDS = 3.0  # timed steps per measurement: at least this long (and 20 steps)


# -- what each method finds ---------------------------------------------------------------------
def ground_truth(method: str, W: np.ndarray, P: np.ndarray) -> dict:
    """The module docstring's ground-truth numbers of components ``P (C, 5, 2)``."""
    mm = mmcs_ml2r_components(W, P)
    cos = np.abs(mm["cos"]) if method == "L3D" else mm["cos"]
    best = np.argmax(cos, axis=0)
    max_cos = cos[best, np.arange(W.shape[0])]
    found = max_cos >= FOUND_COS
    distinct = len(set(best[found].tolist()))  # two features on one component count once
    out = {"mmcs": float(max_cos.mean()), "max_cos": max_cos.tolist(),
           "best_component": best.tolist(), "features_found": distinct,
           "components_shared": distinct < int(found.sum())}
    if method != "L3D":
        out["ml2r"] = float(mm["ml2r"])
    return out


def own_measure(method: str, summary: dict) -> dict:
    """Each method's own fit measure from its evaluation summary."""
    loss = summary.get("loss", {})
    if method == "SPD":
        return {"stochastic_recon": loss.get("stochastic_recon"),
                "faithfulness": loss.get("faithfulness"),
                "alive": summary.get("alive")}
    if method == "APD":
        return {"topk_recon_mse": loss.get("topk_recon"), "faithfulness": loss.get("faithfulness"),
                "alive": summary.get("alive")}
    return {"relative_grad_recon_error": summary.get("recon_error"),
            "recon_error_train": summary.get("recon_error_train"),
            "selectivity": summary.get("selectivity"),
            "selectivity_baseline": summary.get("selectivity_baseline"),
            "alive": summary.get("alive")}


def train_or_load(name: str, seed: int, workdir: pathlib.Path, label: str,
                  overrides=None) -> tuple:
    """``(run, summary, seconds)`` of config ``name`` in ``workdir/<label>_seed<seed>`` (resumed,
    or only loaded when finished)."""
    config = spdjax.config.load(name, {"seed": seed, "figures": False, **(overrides or {})})
    run = spdjax.setup(config, workdir / f"{label}_seed{seed}")
    loop.train(run)
    summary = loop.evaluate(run)
    return run, summary, training_seconds(run)


def training_seconds(run) -> float | None:
    """The training wall time the loop recorded (its last ``metrics.jsonl`` row), also for a
    run loaded finished."""
    path = run.workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    times = [r["wall_time_s"] for r in rows if "wall_time_s" in r]
    return times[-1] if times else None


def components(run) -> np.ndarray:
    return np.asarray(run.method.decomposition.component_weights(run.params, "linear1"),
                      np.float64)


# -- what a step costs --------------------------------------------------------------------------
def time_step(name: str, batch_size: int) -> dict:
    """Seconds per jitted training step of config ``name`` at ``batch_size`` (run in a child)."""
    import jax

    load_before = os.getloadavg()[0]
    config = spdjax.config.load(name, {"batch_size": batch_size, "figures": False})
    with config.unlocked():
        config.eval_batch_size = max(config.eval_batch_size, batch_size)
        if config.method == "l3d" and config.l3d.n_samples < batch_size:
            config.l3d.n_samples = 0  # a batch larger than the fixed set: fresh samples
    run = spdjax.setup(config)
    call = run.step_call(config.steps_per_call)
    state = run.state
    for _ in range(5):  # compile and warm up
        state, metrics = call(state)
    jax.block_until_ready((state, metrics))
    steps, t0 = 0, time.perf_counter()
    while steps < 20 or time.perf_counter() - t0 < TIMING_SECONDS:
        state, metrics = call(state)
        jax.block_until_ready(metrics)
        steps += 1
    s_per_step = (time.perf_counter() - t0) / steps
    return {"config": name, "batch_size": batch_size, "s_per_step": s_per_step,
            "l3d_n_samples": config.l3d.n_samples if config.method == "l3d" else None,
            "steps_per_s": 1 / s_per_step, "timed_steps": steps, "load_avg_1m": load_before}


def costs(methods: dict, batch_sizes: list[int], rounds: int) -> list[dict]:
    """Median step time per (method, batch size) over ``rounds`` interleaved rounds."""
    samples: dict = {}
    for _ in range(rounds):
        for bs in batch_sizes:
            for method, name in methods.items():
                row = row_in_fresh_process("benchmarks.reproduce.three_methods",
                                           f"{name}@{bs}")
                print(json.dumps({"cost": method, **row}), flush=True)
                samples.setdefault((method, bs), []).append(row)
    out = []
    for (method, bs), rows in samples.items():
        s = statistics.median(r["s_per_step"] for r in rows)
        out.append({"method": method, "config": methods[method], "batch_size": bs,
                    "ms_per_step": 1e3 * s, "steps_per_s": 1 / s,
                    "ms_per_step_rounds": [1e3 * r["s_per_step"] for r in rows],
                    "load_avg_1m": [r["load_avg_1m"] for r in rows]})
    return out


def resid_l3d_truth(run, n_refs: int = 4) -> tuple[dict, np.ndarray]:
    """L3D on ResidMLP 1 (module docstring): the summary and the impacts ``[feature, C]``."""
    import jax
    import jax.numpy as jnp

    from spdjax.methods.l3d_terms import encode

    d, params, tp = run.method.decomposition, run.params, run.target_params
    n = run.experiment.model_config.n_features
    x = 0.75 * jnp.eye(n)
    impacts = np.mean([np.abs(np.asarray(encode(d, params, d.per_sample_grads(
        tp, x, jax.random.key(r))))) for r in range(n_refs)], axis=0)
    chosen = impacts.argmax(axis=1)
    W_E = np.asarray(tp["W_E"], np.float64)
    P_in = np.asarray(d.component_weights(params, "layers_0/mlp_in"), np.float64)
    reads = np.linalg.norm(np.einsum("fe,ceh->cfh", W_E, P_in), axis=-1)  # [C, feature]
    top_read = reads.argmax(axis=1)
    return {"distinct_chosen": int(np.unique(chosen).size),
            "chosen_reads_its_feature": int(np.sum(top_read[chosen] == np.arange(n))),
            "impact_share_of_chosen": float(np.mean(impacts.max(1) / impacts.sum(1))),
            "chosen": chosen.tolist()}, impacts


def plot_impacts(impacts: np.ndarray, truth: dict, path: pathlib.Path):
    """L3D on ResidMLP 1: each feature's impacts on the subnetworks (columns ordered by the
    feature that chooses them first), normalised per feature."""
    chosen = np.asarray(truth["chosen"])
    order = list(dict.fromkeys(chosen.tolist()))
    order += [c for c in range(impacts.shape[1]) if c not in order]
    m = impacts[:, order] / impacts.max(axis=1, keepdims=True)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="impact / the feature's largest")
    ax.set(xlabel="subnetwork (ordered by first chooser)", ylabel="feature (one-hot 0.75)",
           title=f"L3D on ResidMLP 1: {truth['distinct_chosen']} distinct chosen subnetworks "
                 f"for {impacts.shape[0]} features")
    return save_figure(fig, path, 120)


# -- figure and tables --------------------------------------------------------------------------
def plot(W: np.ndarray, found: dict[str, np.ndarray], rows: dict, path: pathlib.Path):
    """One row per method: the target's feature vectors, then each component's ``linear1`` slice
    (largest first; L3D's rescaled to the target's largest feature norm and sign-aligned with
    its best feature, as its directions have no scale or sign)."""
    n_cols = 1 + max(min(len(P), 5) for P in found.values())
    fig = Figure(figsize=(2.1 * n_cols, 2.3 * len(found)))
    axs = fig.subplots(len(found), n_cols, squeeze=False)
    colors = feature_colors(W.shape[0])
    lim = 1.15 * float(np.linalg.norm(W, axis=1).max())
    for row, (method, P) in zip(axs, found.items()):
        gt = rows[method]["ground_truth"]
        draw_vectors(row[0], W, colors, lim)
        row[0].set_title(f"{method}: target W\nMMCS {gt['mmcs']:.4f}, found "
                         f"{gt['features_found']}/5", fontsize=8)
        mass = np.linalg.norm(P, axis=-1).sum(axis=-1)
        order = np.argsort(-mass)[:n_cols - 1]
        for ax, c in zip(row[1:], order):
            m = P[c]
            if method == "L3D":
                j = int(np.argmax(np.linalg.norm(m, axis=1)))
                m = m * np.sign(m[j] @ W[j]) * np.linalg.norm(W, axis=1).max() / (
                    np.linalg.norm(m, axis=1).max() + 1e-30)
            draw_vectors(ax, m, colors, lim)
            ax.set_title(f"component {c}" + (" (rescaled)" if method == "L3D" else ""),
                         fontsize=8)
        for ax in row[1 + len(order):]:
            ax.axis("off")
    fig.suptitle("TMS 5-2: each method's components (linear1 rows, one colour per feature)")
    return save_figure(fig, path, 130)


def cost_markdown(result: dict) -> list[str]:
    info = result["machine"]
    lines = ["", f"Step cost ({info['device']}, {info['cpu_count']} cores; median of "
             f"{result['rounds']} rounds, one fresh process each; 1-minute load average before "
             "each):", "", "| method | batch | ms/step | steps/s | ms/step per round | load avg |",
             "|---|---|---|---|---|---|"]
    for c in result["costs"]:
        lines.append(f"| {c['method']} | {c['batch_size']} | {c['ms_per_step']:.2f} | "
                     f"{c['steps_per_s']:.0f} | "
                     f"{', '.join(f'{x:.2f}' for x in c['ms_per_step_rounds'])} | "
                     f"{', '.join(f'{x:.1f}' for x in c['load_avg_1m'])} |")
    return lines + ["", f"Command: `{result['command']}`; {info['date']}, commit "
                        f"{info['commit']}."]


def to_markdown(result: dict) -> str:
    lines = ["| method | recipe | steps x batch | MMCS | features found (cos >= 0.99) | ML2R "
             "| own fit measure | train wall s |", "|---|---|---|---|---|---|---|---|"]
    for method, r in result["methods"].items():
        gt, own = r["ground_truth"], r["own_measure"]
        fit = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in own.items() if v is not None)
        ml2r = f"{gt['ml2r']:.4f}" if "ml2r" in gt else "n/a (directions)"
        wall = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "?"
        lines.append(f"| {method} | `{r['config']}` | {r['steps']} x {r['batch_size']} | "
                     f"{gt['mmcs']:.4f} | {gt['features_found']} of 5 | {ml2r} | {fit} | "
                     f"{wall} |")
    return "\n".join(lines + cost_markdown(result)) + "\n"


def resid_markdown(result: dict) -> str:
    m = result["methods"]
    spd, apd, l3d = m["SPD"], m["APD"], m["L3D"]
    lines = ["| method | recipe | steps x batch | C | what it finds | source |",
             "|---|---|---|---|---|---|",
             f"| SPD | `resid_mlp:1` | {spd['steps']} x 2048 | {spd['C']} | contribution r "
             f"{spd['contribution_r']:.5f}; {spd['distinct_chosen_in_layer0']} distinct W_in "
             f"subcomponents for 100 features | `{RESID_EARLIER}` |",
             f"| APD | `resid_mlp:1+apd` | {apd['steps']} x 256 | {apd['C']} | contribution r "
             f"{apd['contribution_r']:.5f}; {apd['distinct_chosen_in_layer0']} distinct W_in "
             f"components for 100 features | `{RESID_EARLIER}` |",
             f"| L3D | `{l3d['config']}` | {l3d['steps']} x {l3d['batch_size']} | {l3d['C']} | "
             f"{l3d['ground_truth']['distinct_chosen']} distinct chosen subnetworks for 100 "
             f"features; {l3d['ground_truth']['chosen_reads_its_feature']} of 100 read mainly "
             f"their feature; impact share of the chosen "
             f"{l3d['ground_truth']['impact_share_of_chosen']:.3f}; relative gradient recon "
             f"error {l3d['own_measure']['relative_grad_recon_error']:.4f}; "
             f"{l3d['own_measure']['alive']} alive | this run "
             f"({l3d['train_seconds'] or 0:.0f} s) |"]
    return "\n".join(lines + cost_markdown(result)) + "\n"


def run_tms(args, result: dict, workdir: pathlib.Path, out: pathlib.Path) -> None:
    found, W = {}, None
    for method, name in METHODS.items():
        run, summary, seconds = train_or_load(name, args.seed, workdir, method.lower())
        W_run = np.asarray(run.target_params["linear1"]["kernel"], np.float64)
        if W is not None and not np.array_equal(W, W_run):
            raise ValueError(f"{method} decomposed another target than the methods before it.")
        W, P = W_run, components(run)
        found[method] = P
        result["methods"][method] = {
            "config": name, "steps": run.config.steps,
            "batch_size": run.config.batch_size, "C": run.config.C, "train_seconds": seconds,
            "ground_truth": ground_truth(method, W, P), "own_measure": own_measure(method, summary)}
        loop.close(run)
        print(json.dumps({method: result["methods"][method]}), flush=True)
    if not args.skip_costs:
        result["costs"] = costs(METHODS, [int(b) for b in args.batch_sizes.split(",")],
                                args.rounds)
    (out / "three_methods_tms.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "three_methods_tms.md").write_text(to_markdown(result))
    plot(W, found, result["methods"], out / "three_methods_tms.png")
    print(to_markdown(result))


def run_resid(args, result: dict, workdir: pathlib.Path, out: pathlib.Path) -> None:
    rows = json.loads(pathlib.Path(RESID_EARLIER).read_text())["rows"]
    earlier = {r["method"]: r for r in rows}
    for method in ("SPD", "APD"):
        result["methods"][method] = {"config": MODELS["resid-mlp-1"][method],
                                     "source": RESID_EARLIER, **earlier[method]}
    name = MODELS["resid-mlp-1"]["L3D"]
    run, summary, seconds = train_or_load(name, args.seed, workdir, "l3d_resid_mlp_1",
                                          {"steps": args.l3d_steps})
    truth, impacts = resid_l3d_truth(run)
    result["methods"]["L3D"] = {
        "config": name, "steps": run.config.steps, "batch_size": run.config.batch_size,
        "C": run.config.C, "train_seconds": seconds, "ground_truth": truth,
        "own_measure": own_measure("L3D", summary)}
    loop.close(run)
    print(json.dumps({"L3D": result["methods"]["L3D"]["own_measure"],
                      "truth": {k: v for k, v in truth.items() if k != "chosen"}}), flush=True)
    if not args.skip_costs:
        result["costs"] = costs(MODELS["resid-mlp-1"],
                                [int(b) for b in args.batch_sizes.split(",")], args.rounds)
    (out / "three_methods_resid_mlp_1.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "three_methods_resid_mlp_1.md").write_text(resid_markdown(result))
    plot_impacts(impacts, truth, out / "three_methods_resid_mlp_1.png")
    print(resid_markdown(result))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tms-5-2", choices=sorted(MODELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="workdir/three_methods")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--batch_sizes", default="32,2048")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--l3d_steps", type=int, default=1000, help="ResidMLP 1: L3D's steps")
    p.add_argument("--skip_costs", action="store_true", help="ground truth only")
    p.add_argument("--row", help="internal: time one 'config@batch_size' and print it as JSON")
    args = p.parse_args(argv)
    if args.row:
        name, bs = args.row.rsplit("@", 1)
        print(json.dumps(time_step(name, int(bs))))
        return
    out, workdir = pathlib.Path(args.out), pathlib.Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.reproduce.three_methods " + " ".join(argv or sys.argv[1:])
    result = {"command": command, "model": args.model, "seed": args.seed, "machine": machine(),
              "methods": {}, "rounds": args.rounds, "costs": [], "found_cos": FOUND_COS}
    (run_tms if args.model == "tms-5-2" else run_resid)(args, result, workdir, out)


if __name__ == "__main__":
    main()
