"""The one stepping loop: :func:`advance` steps a run (a single one or an ensemble, whose state
has a leading member axis) while it logs, checks health, checkpoints and honours Ctrl-C at step
boundaries.

:func:`advance` steps a train state to a given step in chunks of ``config.steps_per_call`` steps
per jitted call (chunk ends aligned to multiples of it, so log and checkpoint steps are chunk
ends, and a run resumed at any step rejoins the same boundaries). What differs between a single
run and an ensemble is behind the small :class:`Steppable` interface that both implement.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol, Sequence

import jax

from spdjax.training.health import check_health, check_saved_state
from spdjax.training.interrupts import StopRequest
from spdjax.training.progress import Progress
from spdjax.training.step import TrainState

log = logging.getLogger("spdjax")
OnStep = Callable[[int, dict], None]
Sink = Callable[[int, dict], None]


class Steppable(Protocol):
    """What :func:`advance` needs of a run (:class:`~spdjax.training.loop.Run` and
    :class:`~spdjax.training.ensemble.Ensemble`)."""

    config: Any
    checkpointer: Any
    wall_time_s: float
    compiled: bool

    def step_call(self, n: int) -> Callable[[TrainState], tuple[TrainState, dict]]:
        """``state -> (state, metrics stacked [n, ...])``: ``n`` steps in one jitted call."""

    def check_inputs(self) -> None:
        """Raises ``ValueError`` if a step since the last call had bad input (its deferred
        input checks, :class:`~spdjax.training.step.CheckedStep`)."""

    def member_metrics(self, metrics: dict) -> list[dict]:
        """One flat ``{name: value}`` dict per member (a single run: one) of host metrics."""

    def member_params(self, state: TrainState, i: int) -> Any:
        """Member ``i``'s params (health checks)."""

    def member_label(self, i: int) -> str | None:
        """How errors name member ``i`` (None for a single run)."""

    def lr(self, i: int, step: int) -> float:
        """Member ``i``'s learning rate at ``step``."""

    def checkpoint_meta(self, wall_time_s: float) -> dict:
        """The metadata saved with a checkpoint."""


def advance(run: Steppable, state: TrainState, *, stop: int, progress: Progress,
            sinks: Sequence[Sink], checkpoint: bool, on_step: OnStep | None, t0: float,
            histories: Sequence[list], interrupt: StopRequest) -> TrainState:
    """Steps ``state`` to ``stop``: ``sinks[i](step, values)`` of each member every
    ``log_every`` steps and at ``stop``, checkpoints (if ``checkpoint``) every
    ``checkpoint_every``, at the end and when ``interrupt`` was requested (then raises
    ``KeyboardInterrupt``). Every member's health is checked at every log step and before every
    save (``histories[i]``: its logged totals, for the divergence check)."""
    config = run.config
    step, first = int(jax.tree.leaves(state.step)[0].reshape(-1)[0]), True
    # the state whose loss the next call computes first: the initial one, or a saved one
    unverified = step == 0 or (checkpoint and run.checkpointer.latest_step() == step)
    while step < stop:
        end = min(stop, (step // config.steps_per_call + 1) * config.steps_per_call)
        state, per_step = run.step_call(end - step)(state)
        if unverified:  # its loss is the call's first metric line: free to read
            run.check_inputs()  # a nan from bad input is named as such
            starts = run.member_metrics(jax.device_get(jax.tree.map(lambda m: m[0], per_step)))
            for i, values in enumerate(starts):
                _labelled(run, i, check_saved_state, config,
                          run.checkpointer if checkpoint else None, step, values, histories[i])
            unverified = False
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
        log_now = step % config.log_every == 0 or step == stop
        save_now = checkpoint and (step % config.checkpoint_every == 0 or interrupt.requested
                                   or step in (stop, config.steps))
        if log_now or save_now:
            run.check_inputs()  # bad input is named as such, before any health check or save
            lines = run.member_metrics(jax.device_get(jax.tree.map(lambda m: m[-1], per_step)))
            for i, values in enumerate(lines):
                _labelled(run, i, check_health, config, run.checkpointer, step, values,
                          run.member_params(state, i), histories[i])
        wall = run.wall_time_s + time.perf_counter() - t0
        if save_now:
            run.checkpointer.save(step, state, run.checkpoint_meta(wall))
            unverified = True
        if log_now:
            rate = progress.mark(step)
            for i, values in enumerate(lines):
                values["lr"] = max(float(run.lr(i, step - 1)), 0.0)
                values["steps_per_sec"] = rate
                values["wall_time_s"] = wall
                sinks[i](step, values)
            progress.report(step, sum(v["loss/total"] for v in lines) / len(lines))
        if interrupt.requested:
            raise KeyboardInterrupt
    return state


def _labelled(run: Steppable, i: int, check: Callable, *args) -> None:
    """``check(*args)`` for member ``i``, its errors naming the member (of an ensemble)."""
    try:
        check(*args)
    except Exception as e:
        label = run.member_label(i)
        if label is None:
            raise
        raise type(e)(f"Ensemble member {label}: {e}") from e


def writer_sink(writer) -> Sink:
    """A sink that writes each metric line to ``writer`` and flushes it."""
    def sink(step, values):
        writer.write_scalars(step, values)
        writer.flush()
    return sink


def one_per_step(per_step, n: int):
    """Metrics of an ``n``-step call with the step axis leading even for ``n = 1``."""
    return jax.tree.map(lambda m: m[None], per_step) if n == 1 else per_step

