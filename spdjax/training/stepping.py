"""Advancing a run: the jitted step of a :class:`~spdjax.training.loop.Run` and the stepping
loop that logs, checks health, checkpoints and honours Ctrl-C at step boundaries.

:func:`advance` steps a train state to a given step in chunks of ``config.steps_per_call`` steps
per jitted call (chunk ends aligned to multiples of it, so log and checkpoint steps are chunk
ends); :func:`build_step` compiles the run's step for a chunk size.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import jax

from spdjax.training import workdir as wd
from spdjax.training.health import check_health
from spdjax.training.interrupts import StopRequest
from spdjax.training.step import TrainState, make_train_step
from spdjax.training.progress import Progress

log = logging.getLogger("spdjax")
OnStep = Callable[[int, dict], None]


def build_step(run, *, microbatches: int | None = None,
               steps_per_call: int | None = None) -> Callable:
    """The run's jitted ``step(state, target_params, key) -> (state, metrics)`` (K steps per
    call with stacked metrics for ``steps_per_call`` K > 1)."""
    config = run.config
    return make_train_step(
        run.method.objective, run.method.optimizer, run.experiment.batch_fn,
        total_steps=config.steps, mesh=run.mesh, state_sharding=run.state_sharding,
        microbatches=config.microbatches if microbatches is None else microbatches,
        matmul_precision=config.matmul_precision,
        steps_per_call=config.steps_per_call if steps_per_call is None else steps_per_call)


def advance(run, state: TrainState, *, stop: int, progress: Progress, sink, checkpoint: bool,
           on_step: OnStep | None, t0: float, history: list,
           interrupt: StopRequest) -> TrainState:
    """Steps ``state`` to ``stop``: ``sink(step, values)`` every ``log_every`` steps and at
    ``stop``, checkpoints (if ``checkpoint``) every ``checkpoint_every``, at the end and when
    ``interrupt`` was requested (then raises ``KeyboardInterrupt``). The state's health is
    checked at every log step and before every save."""
    config = run.config
    step, first = int(state.step), True
    while step < stop:
        # Chunks of steps_per_call steps, their ends aligned to its multiples (log and checkpoint
        # steps are such multiples), so a run resumed at any step rejoins the same boundaries.
        end = min(stop, (step // config.steps_per_call + 1) * config.steps_per_call)
        state, per_step = _step_fn(run, end - step)(state, run.target_params, run.keys.train)
        if end - step == 1:
            per_step = jax.tree.map(lambda m: m[None], per_step)
        if first:  # exclude compilation / candidate switch from steps/s
            jax.block_until_ready(state)
            if not run.compiled:
                log.info("Compiled in %.1fs.", time.perf_counter() - t0)
                run.compiled = True
            progress.mark(end)
            first = False
        if on_step is not None:
            for i in range(end - step):
                on_step(step + 1 + i, jax.tree.map(lambda m, i=i: m[i], per_step))
        step = end
        metrics = jax.tree.map(lambda m: m[-1], per_step)
        log_now = step % config.log_every == 0 or step == stop
        save_now = checkpoint and (step % config.checkpoint_every == 0 or interrupt.requested
                                   or step in (stop, config.steps))
        if log_now or save_now:
            values = wd.flatten_metrics(jax.device_get(metrics))
            check_health(run.config, run.checkpointer, step, values, state.params, history)
        if save_now:
            run.checkpointer.save(step, state, run.checkpoint_meta())
        if log_now:
            values["lr"] = max(float(run.schedule(step - 1)), 0.0)
            values["steps_per_sec"] = progress.mark(step)
            values["wall_time_s"] = run.wall_time_s + time.perf_counter() - t0
            sink(step, values)
            progress.report(step, values["loss/total"])
        if interrupt.requested:
            raise KeyboardInterrupt
    return state


def _step_fn(run, n: int) -> Callable:
    """The jitted step that advances ``n`` steps per call (the run's own for steps_per_call)."""
    if n == run.config.steps_per_call:
        return run.step_fn
    if n not in run.other_step_fns:  # a remainder chunk (resume, stop): compiled once
        run.other_step_fns[n] = build_step(run, steps_per_call=n)
    return run.other_step_fns[n]


def write_sink(run):
    def sink(step, values):
        run.writer.write_scalars(step, values)
        run.writer.flush()
    return sink
