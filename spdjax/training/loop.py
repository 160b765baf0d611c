"""The managed run: ``setup(config, workdir, family=..., method=...) -> Run``,
``train(run, until_step)``, ``evaluate(run)``, ``plot(run)``, ``close(run)``.

The run layer takes values: a target :class:`~spdjax.training.family.Family` and a
:class:`~spdjax.methods.base.MethodSpec` (names are resolved one layer up, in
:mod:`spdjax.config.runs`, which is what ``spdjax.setup`` and the CLI call). A config becomes a
run in four moves, readable top to bottom in :func:`setup`: the experiment (target, data,
ground-truth evaluation), the method (init, objective, optimizer), the mesh and the train state
(fresh, or resumed from the workdir's latest checkpoint), and one jitted step. :func:`train`
steps it with the one stepping loop (:func:`spdjax.training.stepping.advance`): logging,
checkpoints, finite and divergence checks, Ctrl-C; :func:`evaluate` writes the summary;
:func:`plot` the figures. :func:`train_and_evaluate` does all of it. An ensemble
(:mod:`spdjax.training.ensemble`) is a run with a member axis, stepped by the same loop.

Nothing here knows which method it trains: params are an opaque pytree, the metrics a nested
dict with ``loss/total``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np

from spdjax.analysis import suite, suite_plots
from spdjax.analysis.plots import plot_training_curves
from spdjax.methods.base import Method, MethodSpec
from spdjax.training import init_selection, workdir as wd, writers
from spdjax.training import targets as target_training
from spdjax.training import sharding as shard_lib
from spdjax.training.checkpoints import (Checkpointer, CheckpointDamagedError,
                                         CheckpointFormatError, CheckpointVersionError)
from spdjax.training.distributed import is_primary
from spdjax.training.health import DivergenceError, evaluation_diverged, nonfinite_values
from spdjax.training.interrupts import StopRequest
from spdjax.training.schedules import make_schedule
from spdjax.training.step import TrainState, init_train_state
from spdjax.training.family import Experiment, Family, build_experiment
from spdjax.training.progress import Progress, announce_evaluation, log_to
from spdjax.training.step import CheckedStep, make_train_step
from spdjax.training.stepping import OnStep, advance, one_per_step, writer_sink
from spdjax.training.validation import validate
from spdjax.training.workdir import ConfigMismatchError

log = logging.getLogger("spdjax")


@dataclasses.dataclass(frozen=True)
class RunKeys:
    """A run's independent key streams: ``init`` draws the component factors and CI functions,
    ``train`` the data and masks of every step, ``eval`` the final evaluation batch."""

    init: jax.Array
    train: jax.Array
    eval: jax.Array

    @classmethod
    def from_seed(cls, seed: int) -> "RunKeys":
        return cls(*jax.random.split(jax.random.key(seed), 3))


@dataclasses.dataclass(eq=False)
class Run:
    """Everything a training run holds; ``state`` advances as :func:`train` runs.

    ``workdir`` is None for a run kept in memory (benchmarks, probes, tests): then nothing is
    written and the metric lines collect in ``writer.rows``.
    """

    config: Any
    workdir: pathlib.Path | None
    experiment: Experiment
    method: Method
    method_spec: MethodSpec
    schedule: Callable
    mesh: jax.sharding.Mesh
    target_params: Any
    keys: RunKeys
    state: TrainState
    state_sharding: Any
    step_fn: Callable
    checkpointer: Checkpointer | None
    writer: Any
    wall_time_s: float = 0.0
    init_record: dict | None = None
    compiled: bool = False  # the step has run once (compilation is reported once)
    lock: Any = None  # the workdir lock, released by close()
    recent_losses: list = dataclasses.field(default_factory=list)  # logged totals: divergence
    other_step_fns: dict = dataclasses.field(default_factory=dict)  # remainder chunks, by size
    hparams: dict | None = None  # the method's traced hparams (None: it has none)
    target_fingerprint: str | None = None  # sha256 of the target params (checkpoint meta)
    target_source: str = "the target given"  # where the target was read from (for errors)
    closed: bool = False  # close() released the workdir: no more training

    @property
    def step(self) -> int:
        return int(self.state.step)

    @property
    def params(self) -> Any:
        return self.state.params

    # -- what the stepping loop needs (spdjax.training.stepping.Steppable) ---------------------
    def step_call(self, n: int) -> Callable:
        if n == self.config.steps_per_call:
            fn = self.step_fn
        else:  # a remainder chunk (resume, stop): compiled once
            if n not in self.other_step_fns:
                self.other_step_fns[n] = build_step(self, steps_per_call=n)
            fn = self.other_step_fns[n]

        def call(state):
            state, per_step = fn(state, self.target_params, self.keys.train, self.hparams)
            return state, one_per_step(per_step, n)
        return call

    def check_inputs(self) -> None:
        for fn in (self.step_fn, *self.other_step_fns.values()):
            if isinstance(fn, CheckedStep):
                fn.raise_pending()

    def member_metrics(self, metrics: dict) -> list[dict]:
        return [wd.flatten_metrics(metrics)]

    def member_params(self, state: TrainState, i: int) -> Any:
        return state.params

    def member_label(self, i: int) -> str | None:
        return None

    def lr(self, i: int, step: int) -> float:
        return float(self.schedule(step))

    def checkpoint_meta(self, wall_time_s: float | None = None) -> dict:
        return {"method": self.method.name, "config": wd.config_dict(self.config),
                "target_sha256": self.target_fingerprint}


def build_step(run: Run, *, microbatches: int | None = None,
               steps_per_call: int | None = None) -> Callable:
    """The run's jitted ``step(state, target_params, key, hparams) -> (state, metrics)`` (K
    steps per call with stacked metrics for ``steps_per_call`` K > 1)."""
    config = run.config
    step = make_train_step(
        run.method.objective, run.method.optimizer, run.experiment.batch_fn,
        total_steps=config.steps, mesh=run.mesh, state_sharding=run.state_sharding,
        microbatches=config.microbatches if microbatches is None else microbatches,
        matmul_precision=config.matmul_precision,
        steps_per_call=config.steps_per_call if steps_per_call is None else steps_per_call)
    if isinstance(step, CheckedStep):  # read at log and checkpoint steps (Run.check_inputs)
        step.defer = True
    return step


def state_from_params(run: Run, params: Any) -> TrainState:
    """A step-0 train state holding ``params``, laid out on the run's mesh."""
    params = shard_lib.shard_params(run.method, params, run.mesh)
    return shard_lib.place_state(init_train_state(params, run.method.optimizer), run.mesh)[0]


def initial_state(run: Run, key: jax.Array) -> TrainState:
    """A fresh train state from ``key`` (the method's init), laid out on the run's mesh."""
    return state_from_params(run, run.method.init(key, run.experiment.target_params))


def setup(config, workdir: str | pathlib.Path | None = None, *, family: Family,
          method: MethodSpec, fresh: bool = False, allow_changes: tuple[str, ...] = (),
          target_params: Any = None, upgrade_record: Callable[[dict], dict] | None = None
          ) -> Run:
    """Builds (or, from ``workdir``'s latest good checkpoint, resumes) a run of ``config`` that
    decomposes ``family``'s target with ``method``.

    ``target_params`` (optional) are the target's params, instead of the family's
    ``load_target_params``. The workdir is locked for this process until :func:`close`. A
    resume with a changed config is refused unless the changed fields are in ``allow_changes``
    (e.g. ``("lr", "steps")``) or only change reporting
    (:data:`spdjax.training.workdir.SAFE_CHANGES`); ``upgrade_record`` gives an older run's
    recorded config the fields added since (the config layer passes its own).
    """
    validate(config, family, method)
    lock, workdir, changes = open_workdir(config, workdir, fresh=fresh,
                                          allow_changes=allow_changes, upgrade=upgrade_record)
    try:
        run = _build(config, workdir, family, method, target_params)
        run.lock = lock
        if workdir is not None:
            _resume(run, changes)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run


def build_method(run: Run, config) -> Method:
    """``run``'s method built anew for ``config`` (same target; e.g. an ensemble member's own
    coefficients)."""
    return run.method_spec.build(config, run.experiment, run.schedule)


def open_workdir(config, workdir, *, fresh: bool, allow_changes=(), upgrade=None):
    """``(lock, workdir path, config changes)``: ``workdir`` checked (a directory, its run files
    of the right kind), created, locked for this process and its run checked against ``config``
    (:func:`spdjax.training.workdir.check_resume`, with ``upgrade`` for old records; ``fresh``
    moves an old run aside first); ``(None, None, [])`` in memory. Nothing of the run is written
    yet: ``config.json`` and ``history.jsonl`` are written once its checkpoints are known to fit
    (:func:`restore`). Only the primary process of a multi-process run owns the workdir's
    files."""
    if workdir is None:
        return None, None, []
    workdir = pathlib.Path(workdir)
    wd.check_paths(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise wd.UnusableWorkdirError(f"--workdir {workdir} cannot be created: {e}.") from None
    if not is_primary():
        return None, workdir, []
    lock = wd.WorkdirLock(workdir)
    try:
        if fresh:
            wd.move_aside(workdir)
        changes = wd.check_resume(workdir, wd.config_dict(config),
                                  allow_changes=tuple(allow_changes), upgrade=upgrade)
    except BaseException:
        lock.release()
        raise
    return lock, workdir, changes


def restore(checkpointer: Checkpointer, template: Any, workdir: pathlib.Path, *,
            fingerprint: str | None, target_source: str) -> tuple[Any, int]:
    """``(state, step)`` of the newest good checkpoint in ``workdir`` (``(None, 0)``: none),
    damaged newer ones moved to ``workdir/damaged``. Refused, with nothing moved, when the
    checkpoints do not fit ``template`` (a config change of the state's shapes: not damage),
    when every checkpoint is damaged, or when the checkpoint was trained on another target than
    the one loaded (``fingerprint``, from ``target_source``)."""
    try:
        state, start = checkpointer.restore_latest_valid(template, quarantine=workdir / "damaged")
    except CheckpointVersionError as e:
        raise wd.UnusableWorkdirError(str(e)) from None
    except CheckpointFormatError as e:
        raise wd.structural_change_error(workdir, str(e)) from None
    except CheckpointDamagedError as e:
        raise wd.UnusableWorkdirError(
            f"{e} The run does not restart at step 0 on its own: {wd.FRESH_HINT}.") from None
    if start:
        saved = checkpointer.read_meta(start).get("target_sha256")
        if saved is not None and fingerprint is not None and saved != fingerprint:
            raise wd.UnusableWorkdirError(
                f"Checkpoint {start} in {workdir} was trained on another target (sha256 "
                f"{saved[:12]}) than the one loaded now (sha256 {fingerprint[:12]}, from "
                f"{target_source}); put back the run's own {workdir / 'target_params.npz'}, "
                f"or {wd.FRESH_HINT}.")
    return state, start


def target_fingerprint(params: Any) -> str:
    """sha256 of a target's arrays (dtypes, shapes and bytes, in pytree order): recorded in each
    checkpoint, so a resume can tell that it decomposes the target the run was trained on."""
    h = hashlib.sha256()
    for x in jax.tree.leaves(jax.device_get(params)):
        a = np.ascontiguousarray(np.asarray(x))
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def make_lr_schedule(config) -> Callable:
    """The learning-rate schedule of ``config`` (``lr``, ``lr_schedule``, warm-up, final)."""
    return make_schedule(config.lr_schedule, config.lr, config.steps,
                         warmup_frac=config.lr_warmup_frac, final_frac=config.lr_final_frac)


def _saved_target(workdir: pathlib.Path | None) -> tuple[Any, str | None]:
    """A resumed run decomposes the target it started with, kept in its workdir: ``(params,
    None)``, or ``(None, why not)`` (a damaged or missing file: the target is then loaded anew
    and the checkpoint's fingerprint tells whether it is the same)."""
    path = workdir / "target_params.npz" if workdir is not None else None
    if path is None or not any((workdir / "checkpoints").glob("[0-9]*")):
        return None, None
    if not path.exists():
        return None, f"{path} is missing"
    try:
        return target_training.load_params(path), None
    except Exception as e:  # noqa: BLE001 - a damaged file: the cache may have the same target
        log.warning("%s is damaged (%s); loading the target anew (its fingerprint is checked "
                    "against the checkpoint's).", path, e)
        return None, f"{path} is damaged"


def _build(config, workdir: pathlib.Path | None, family: Family, spec: MethodSpec,
           target_params: Any = None) -> Run:
    log.info("spdjax: %s %s -> %s (devices: %d x %s)", family.name, config.variant,
             workdir or "memory", jax.device_count(), jax.devices()[0].platform)
    if config.get("eval_suite", False):
        suite.options_from_config(config)  # a bad eval_pgd_* fails now, not after training
    saved, why_not = _saved_target(workdir)
    experiment = build_experiment(config, family,
                                  target_params=saved if saved is not None else target_params)
    if saved is not None:
        source = f"{workdir / 'target_params.npz'}"
    else:
        cache = config.get("target_cache_dir") or target_training.default_cache_dir()
        source = ("the target_params given" if target_params is not None else
                  f"the target cache ({cache})")
        source += f", as {why_not}" if why_not else ""
    schedule = make_lr_schedule(config)
    method = spec.build(config, experiment, schedule)
    mesh = shard_lib.make_mesh(model=config.mesh_model)
    keys = RunKeys.from_seed(config.seed)
    shapes = jax.eval_shape(method.init, keys.init, experiment.target_params)
    shard_lib.check_divisible(shapes, method.partition_specs(shapes, shard_lib.MODEL), mesh,
                              config.batch_size)
    run = Run(config=config, workdir=workdir, experiment=experiment, method=method,
              method_spec=spec,
              schedule=schedule, mesh=mesh,
              target_params=shard_lib.replicate(experiment.target_params, mesh), keys=keys,
              state=None, state_sharding=None, step_fn=None, checkpointer=None, writer=None,
              hparams=method.hparams_of(config) or None,
              target_fingerprint=target_fingerprint(experiment.target_params),
              target_source=source)
    # One batch through the target before compiling anything: shapes, NaN/inf, token ids.
    method.decomposition.clean_forward(experiment.target_params,
                                       experiment.batch_fn(jax.random.key(0)))
    run.state = initial_state(run, keys.init)
    run.state_sharding = jax.tree.map(lambda x: x.sharding, run.state)
    run.step_fn = build_step(run)
    run.writer = wd.MemoryWriter()
    return run


def _resume(run: Run, changes: list = ()) -> None:
    """Restores the newest good checkpoint of ``run.workdir`` (damaged ones are moved aside;
    :func:`restore`), then records the start (``config.json``, ``history.jsonl``) and makes every
    file of the workdir agree with it. Nothing is written when the checkpoints are refused."""
    workdir, primary = run.workdir, is_primary()
    run.checkpointer = Checkpointer(workdir / "checkpoints")
    try:
        state, start = restore(run.checkpointer, run.state, workdir,
                               fingerprint=run.target_fingerprint, target_source=run.target_source)
    except BaseException:
        run.checkpointer.close()
        raise
    if primary:
        wd.record_start(workdir, wd.config_dict(run.config), list(changes), start)
        target_training.save_params(workdir / "target_params.npz", run.experiment.target_params)
    if start:
        run.state = state
        rows = [r for r in wd.read_metric_lines(workdir / "metrics.jsonl") if r["step"] <= start]
        run.wall_time_s = float(rows[-1].get("wall_time_s", 0.0)) if rows else 0.0
        run.recent_losses = [r["loss/total"] for r in rows if "loss/total" in r]
        run.init_record = init_selection.load_record(workdir)
        log.info("Resuming from the checkpoint at step %d.", start)
    elif primary:
        (workdir / init_selection.RECORD_FILE).unlink(missing_ok=True)
    if start < run.config.steps and primary:  # a summary or figures of an earlier end are stale
        (workdir / "summary.json").unlink(missing_ok=True)
        shutil.rmtree(workdir / "figures", ignore_errors=True)
    run.writer = (writers.make_writer(run.config, workdir, start if start else None) if primary
                  else wd.MemoryWriter())


def _select_init(run: Run, t0: float, interrupt: StopRequest) -> None:
    """Best-of-K initialisation (:mod:`spdjax.training.init_selection`), then a checkpoint."""
    n_cand, n_select = run.config.init_candidates, run.config.init_select_steps

    def probe(index):
        state = run.state if index == 0 else initial_state(
            run, init_selection.candidate_key(run.keys.init, index))
        lines, tail = [], init_selection.TailMean(n_select)
        progress = Progress(n_select, 0, label=f"init candidate {index + 1}/{n_cand}")
        state = advance(run, state, stop=n_select, progress=progress,
                        sinks=[lambda *line: lines.append(line)], checkpoint=False,
                        on_step=tail, t0=t0, histories=[[]], interrupt=interrupt)
        return init_selection.Probe(index, tail.value(), state, lines)

    best, record = init_selection.select(n_cand, probe, report=log.info)
    run.state = best.state
    for line in best.lines:
        writer_sink(run.writer)(*line)
    record["steps"] = n_select
    run.init_record = record
    if run.workdir is not None and is_primary():
        init_selection.save_record(run.workdir, record)
        run.checkpointer.save(n_select, run.state, run.checkpoint_meta())  # never redone


def train(run: Run, until_step: int | None = None, *, on_step: OnStep | None = None) -> Run:
    """Trains ``run`` up to ``until_step`` (default: ``config.steps``); returns it.

    ``on_step(step, metrics)`` is called after every step with the step's device metrics (no
    host sync unless it makes one). A run interrupted or stopped early resumes from its
    checkpoints with the same result as an uninterrupted one.
    """
    if run.closed:
        raise RuntimeError("This run is closed (close() released its workdir and files); set it "
                           "up again (spdjax.setup with the same workdir resumes it) to train on.")
    until = run.config.steps if until_step is None else int(until_step)
    if not run.step <= until <= run.config.steps:
        raise ValueError(f"until_step={until_step} must be in [{run.step}, {run.config.steps}].")
    if run.step >= until:
        return run
    t0 = time.perf_counter()
    log.info("Compiling the train step (the first step takes a few seconds)...")
    try:
        with StopRequest() as interrupt:
            if run.step == 0 and run.config.init_candidates > 1:
                _select_init(run, t0, interrupt)
            run.state = advance(run, run.state, stop=until,
                                progress=Progress(run.config.steps, run.step),
                                sinks=[writer_sink(run.writer)],
                                checkpoint=run.checkpointer is not None, on_step=on_step, t0=t0,
                                histories=[run.recent_losses], interrupt=interrupt)
    except BaseException:  # diverged, interrupted, ...: the workdir must agree with itself
        if run.checkpointer is not None:
            run.checkpointer.wait()
            run.writer.flush()
            if is_primary():
                wd.set_aside_lines_after(run.workdir / "metrics.jsonl",
                                         run.checkpointer.latest_step() or 0)
        raise
    run.wall_time_s += time.perf_counter() - t0
    if run.checkpointer is not None:
        run.checkpointer.wait()
    return run


def evaluate(run: Run) -> dict:
    """The method's metrics (loss terms, CI-L0, alive) on a fresh evaluation batch and the
    experiment's ground-truth metrics; written to ``summary.json`` when the run has a workdir.
    A non-finite method metric (e.g. ``loss.total = inf``) raises :class:`DivergenceError`
    instead (nothing written; the state's checkpoint is moved to ``damaged/``)."""
    announce_evaluation(run.config.eval_batch_size, run.config.eval_microbatches)
    k_batch, k_loss = jax.random.split(run.keys.eval)
    batch = run.experiment.eval_batch_fn(k_batch)
    params = jax.device_get(run.state.params)
    summary = run.method.evaluate(params, run.experiment.target_params, batch, k_loss,
                                  microbatches=run.config.eval_microbatches)
    bad = nonfinite_values(summary)  # the method's losses; the experiment's may be nan (n/a)
    if bad:  # not a success: no summary.json
        raise evaluation_diverged(run.config, run.checkpointer, run.step, bad)
    summary.update(run.experiment.evaluate(run.method.decomposition, params, steps=run.step))
    if run.config.get("eval_suite", False):
        summary["suite"] = suite.evaluate_for_config(
            run.config, run.method.decomposition, params, run.experiment.target_params, batch,
            k_loss)
        writers.write_evaluation(run.writer, run.step, suite.flat_scalars(summary["suite"]))
    summary.update(steps=run.step, wall_time_s=run.wall_time_s)
    if run.init_record is not None:
        summary["init_selection"] = run.init_record
    if run.workdir is not None and is_primary():
        wd.write_atomic(run.workdir / "summary.json",
                        json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log.info("Summary: " + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()
                                     if isinstance(v, float)))
    for note in summary.get("warnings", []):
        log.warning(note)
    return summary


def plot(run, figures_dir: str | pathlib.Path | None = None) -> list[pathlib.Path]:
    """The experiment's figures of a :class:`Run`'s (or :func:`spdjax.load`'s) params, and the
    training curves when there is a ``metrics.jsonl`` (default: into ``workdir/figures``)."""
    if figures_dir is None:
        if run.workdir is None:
            raise ValueError("plot(run) of a run without a workdir needs a figures_dir.")
        figures_dir = run.workdir / "figures"
    figures_dir = pathlib.Path(figures_dir)
    paths = run.experiment.plot(run.method.decomposition, jax.device_get(run.params),
                                figures_dir)
    saved = run.workdir / "summary.json" if run.workdir is not None else None
    if saved is not None and saved.exists():
        paths += suite_plots.plot_suite(json.loads(saved.read_text()).get("suite"), figures_dir)
    if run.workdir is not None and (run.workdir / "metrics.jsonl").exists():
        paths.append(plot_training_curves(run.workdir / "metrics.jsonl",
                                          figures_dir / "training_curves.png"))
    return paths


def close(run: Run) -> None:
    """Waits for pending checkpoint writes, closes the run's files and releases its workdir;
    :func:`train` refuses a closed run."""
    run.closed = True
    release(run.checkpointer, [run.writer], run.lock)


def release(checkpointer: Checkpointer | None, writers_: list, lock) -> None:
    """Waits for and closes ``checkpointer``, closes ``writers_``, then releases ``lock``."""
    try:
        if checkpointer is not None:
            checkpointer.wait()
            checkpointer.close()
        for w in writers_:
            w.close()
    finally:
        if lock is not None:
            lock.release()


class EvaluationError(RuntimeError):
    """Training finished (and is saved) but the final evaluation failed."""


def train_and_evaluate(config, workdir: str | pathlib.Path, *, family: Family,
                       method: MethodSpec, fresh: bool = False,
                       allow_changes: tuple[str, ...] = (),
                       upgrade_record: Callable[[dict], dict] | None = None) -> dict:
    """Trains (or resumes) a run in ``workdir``, evaluates and plots it; returns the summary.

    Progress goes to the ``"spdjax"`` logger, printed to stdout unless the application set up a
    handler of its own. If the evaluation fails after training, the trained run is already
    checkpointed: rerunning evaluates it without training (its evaluation settings, e.g.
    ``eval_microbatches``, may be changed for that).
    """
    with log_to():
        run = setup(config, workdir, family=family, method=method, fresh=fresh,
                    allow_changes=allow_changes, upgrade_record=upgrade_record)
        try:
            train(run)
            try:
                summary = evaluate(run)
                if run.config.figures and is_primary():
                    run.writer.write_images(run.step, [p for p in plot(run) if p.suffix == ".png"])
            except DivergenceError:
                raise
            except Exception as e:
                raise EvaluationError(
                    f"Training finished and is saved (step {run.step} in {workdir}), but the "
                    f"evaluation failed: {type(e).__name__}: {e}. Rerun the same command to "
                    "evaluate without training, e.g. with --config.eval_microbatches=8 or a "
                    "smaller --config.eval_batch_size.") from e
        finally:
            close(run)
        return summary


__all__ = ["ConfigMismatchError", "DivergenceError", "EvaluationError", "Run", "RunKeys",
           "build_step", "close", "evaluate", "initial_state", "make_lr_schedule",
           "open_workdir", "plot", "restore", "setup", "state_from_params", "target_fingerprint",
           "train", "train_and_evaluate", "validate"]
