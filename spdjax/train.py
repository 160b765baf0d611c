"""The training loop: config in, trained decomposition + metrics + figures + summary out.

Readable top to bottom: validate the workdir, build the experiment, init or resume the state,
run the jitted step with logging and checkpoints, evaluate. Everything the loop writes:

    workdir/config.json      the resolved config
    workdir/metrics.jsonl    one line per log step: step, loss terms, lr, CI-L0 per site, steps/s
    workdir/checkpoints/     orbax checkpoints of the train state (resumed by default)
    workdir/summary.json     the final evaluation
    workdir/figures/*.png
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import sys
import time
from typing import Any, TextIO

import jax
import numpy as np

from spdjax import evaluation, init_selection
from spdjax import sharding as shard_lib
from spdjax.checkpoints import Checkpointer
from spdjax.components import faithfulness_warmup
from spdjax.experiment import Experiment, build_experiment
from spdjax.losses import faithfulness, make_context, make_total_loss
from spdjax.reporting import JsonlWriter, Progress
from spdjax.schedules import make_schedule
from spdjax.step import (TrainState, init_train_state, make_optimizer, make_train_step,
                         spd_objective)


class ConfigMismatchError(ValueError):
    """The workdir holds a run with a different config."""


def _jsonable(tree: Any) -> Any:
    return json.loads(json.dumps(tree, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def prepare_workdir(workdir: pathlib.Path, resolved: dict, *, fresh: bool) -> None:
    """Refuses to resume a run whose config differs, unless ``fresh`` (which wipes the run)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.json"
    if fresh:
        for name in ("checkpoints", "figures"):
            shutil.rmtree(workdir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json", "config.json",
                     init_selection.RECORD_FILE):
            (workdir / name).unlink(missing_ok=True)
    elif config_path.exists() and (workdir / "checkpoints").exists():
        diff = _diff(json.loads(config_path.read_text()), resolved)
        if diff:
            raise ConfigMismatchError(
                f"{workdir} holds a run with a different config ({'; '.join(diff)}). Use another "
                "--workdir, or pass --fresh to discard that run and start over."
            )
    config_path.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")


def _check_finite(metrics: dict, step: int, ckpt_dir: pathlib.Path) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"Non-finite metrics at step {step}: {bad}. The last good checkpoint is in {ckpt_dir}; "
            "lower the lr or the loss coefficients and resume."
        )


def _last_wall_time(metrics_path: pathlib.Path) -> float:
    if not metrics_path.exists():
        return 0.0
    lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
    return float(json.loads(lines[-1]).get("wall_time_s", 0.0)) if lines else 0.0


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A run's three independent key streams: ``(init, train, eval)``.

    ``init`` draws the component factors and CI functions, ``train`` the data and masks of every
    step, ``eval`` the final evaluation batch.
    """
    k_init, k_train, k_eval = jax.random.split(jax.random.key(seed), 3)
    return k_init, k_train, k_eval


def init_params(config, exp: Experiment, key: jax.Array) -> dict:
    """Component + CI init, then the optional faithfulness warm-up (later reference)."""
    decomp = exp.decomposition
    params = decomp.init(key, exp.target_params, init=config.init)
    if config.faithfulness_warmup_steps > 0:
        dummy = exp.eval_batch_fn(key)

        def faith(comps):
            p = {"components": comps, "ci": params["ci"]}
            return faithfulness(p, make_context(decomp, exp.target_params, p, dummy))

        params["components"] = jax.jit(
            lambda c: faithfulness_warmup(c, faith, steps=config.faithfulness_warmup_steps)
        )(params["components"])
    return params


def evaluate_run(config, exp: Experiment, objective, params: dict, key, figures_dir) -> dict:
    """Loss terms, CI-L0 and alive counts on a fresh eval batch, plus the family's own metrics."""
    k_batch, k_loss = jax.random.split(key)
    batch = exp.eval_batch_fn(k_batch)
    _, metrics = jax.jit(objective)(params, exp.target_params, batch, k_loss, 1.0)
    ctx = jax.jit(lambda p, b: make_context(exp.decomposition, exp.target_params, p, b))(
        params, batch
    )
    summary: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
    summary["ci_l0"] = {n: float(metrics[f"ci_l0/{n}"]) for n in exp.decomposition.site_names}
    summary["alive"] = {
        n: int(np.sum(evaluation.alive_components(np.asarray(c.lower), config.l0_threshold)))
        for n, c in ctx.ci.items()
    }
    summary.update(exp.evaluate(params, pathlib.Path(figures_dir)))
    return summary


def _run_steps(state, step_fn, target_params, key, *, start: int, stop: int, log_every: int,
               on_log, after_step, tail: int = 0):
    """Steps ``start + 1 .. stop``, calling ``after_step(step, state)`` after each and
    ``on_log(step, metrics)`` every ``log_every`` steps and at ``stop``. Returns the state and the
    mean total loss over the last ``tail`` steps (summed on device; nan if ``tail`` is 0)."""
    tail_sum = 0.0
    for step in range(start + 1, stop + 1):
        state, metrics = step_fn(state, target_params, key)
        after_step(step, state)
        if step > stop - tail:
            tail_sum = tail_sum + metrics["loss/total"]
        if step % log_every == 0 or step == stop:
            on_log(step, metrics)
    return state, (float(tail_sum) / tail if tail else float("nan"))


def train_and_evaluate(
    config, workdir: str | pathlib.Path, *, fresh: bool = False, stream: TextIO = sys.stdout
) -> dict:
    """Trains (or resumes) an SPD run in ``workdir`` and returns the final summary."""
    workdir = pathlib.Path(workdir)
    resolved = _jsonable(config.to_dict())
    prepare_workdir(workdir, resolved, fresh=fresh)
    say = lambda msg: print(msg, file=stream, flush=True)  # noqa: E731
    say(f"spdjax: {config.experiment} {config.variant} -> {workdir} "
        f"(devices: {jax.device_count()} x {jax.devices()[0].platform})")

    # Validate the cheap parts of the config before training or loading a target.
    make_total_loss(config.losses.to_dict())
    init_selection.check_config(config)
    schedule = make_schedule(config.lr_schedule, config.lr, config.steps,
                             warmup_frac=config.lr_warmup_frac, final_frac=config.lr_final_frac)
    exp = build_experiment(config)
    decomp = exp.decomposition
    objective = spd_objective(decomp, config.losses.to_dict(), l0_threshold=config.l0_threshold)
    optimizer = make_optimizer(decomp, schedule)
    k_init, k_train, k_eval = run_keys(config.seed)

    mesh = shard_lib.make_mesh(model=config.mesh_model)
    shard_lib.check_divisible(decomp, mesh, config.batch_size)
    target_params = shard_lib.replicate(exp.target_params, mesh)

    def initial_state(key):
        params = shard_lib.shard_params(decomp, init_params(config, exp, key), mesh)
        return shard_lib.place_state(init_train_state(params, optimizer), mesh)

    state, state_sharding = initial_state(k_init)
    ckpt_dir = workdir / "checkpoints"
    ckpt = Checkpointer(ckpt_dir)
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(state)
        say(f"Resuming from the checkpoint at step {start}.")
    metrics_path = workdir / "metrics.jsonl"
    wall_offset = _last_wall_time(metrics_path) if start else 0.0
    writer = JsonlWriter(metrics_path, resume_step=start if start else None)

    step_fn = make_train_step(objective, optimizer, exp.batch_fn, total_steps=config.steps,
                              mesh=mesh, state_sharding=state_sharding,
                              microbatches=config.microbatches)
    t_start = time.perf_counter()
    compiled = False

    def hooks(progress: Progress, sink, checkpoint: bool):
        """``on_log`` (metrics -> sink + progress line) and ``after_step`` for one segment."""
        def after_step(step, state):
            nonlocal compiled
            if step == progress.start + 1:  # exclude compilation / candidate switch from steps/s
                jax.block_until_ready(state)
                if not compiled:
                    say(f"Compiled in {time.perf_counter() - t_start:.1f}s.")
                    compiled = True
                progress.mark(step)
            if checkpoint and (step % config.checkpoint_every == 0 or step == config.steps):
                ckpt.save(step, state)

        def on_log(step, metrics):
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            _check_finite(values, step, ckpt_dir)
            values["lr"] = float(schedule(step - 1))
            values["steps_per_sec"] = progress.mark(step)
            values["wall_time_s"] = wall_offset + time.perf_counter() - t_start
            sink(step, values)
            progress.report(step, values["loss/total"])
        return {"on_log": on_log, "after_step": after_step}

    def write(step, values):
        writer.write_scalars(step, values)
        writer.flush()

    if start < config.steps:
        say("Compiling the train step (the first step takes a few seconds)...")
    record = init_selection.load_record(workdir) if start else None
    n_cand, n_select = config.init_candidates, config.init_select_steps
    if start == 0:
        (workdir / init_selection.RECORD_FILE).unlink(missing_ok=True)
    if start == 0 and n_cand > 1:
        def probe(index):
            cand = state if index == 0 else initial_state(
                init_selection.candidate_key(k_init, index))[0]
            logs = []
            progress = Progress(n_select, 0, stream, label=f"init candidate {index + 1}/{n_cand}")
            cand, loss = _run_steps(cand, step_fn, target_params, k_train, start=0,
                                    stop=n_select, log_every=config.log_every,
                                    tail=max(1, n_select // 4),
                                    **hooks(progress, lambda *line: logs.append(line), False))
            return init_selection.Probe(index, loss, cand, logs)

        best, record = init_selection.select(n_cand, probe, report=say)
        state, start = best.state, n_select
        for line in best.logs:
            write(*line)
        record["steps"] = n_select
        init_selection.save_record(workdir, record)
        ckpt.save(start, state)  # a resume never redoes the selection
    progress = Progress(config.steps, start, stream)
    state, _ = _run_steps(state, step_fn, target_params, k_train, start=start, stop=config.steps,
                          log_every=config.log_every, **hooks(progress, write, True))
    ckpt.wait()
    ckpt.close()
    writer.close()
    wall = wall_offset + time.perf_counter() - t_start

    summary = evaluate_run(config, exp, objective, jax.device_get(state.params), k_eval,
                           workdir / "figures")
    summary.update(steps=int(state.step), wall_time_s=wall)
    if record is not None:
        summary["init_selection"] = record
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    say("Summary: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()
                                if isinstance(v, float) and not k.startswith("loss/")))
    for note in summary.get("warnings", []):
        say(f"WARNING: {note}")
    return summary


__all__ = ["ConfigMismatchError", "TrainState", "train_and_evaluate"]
