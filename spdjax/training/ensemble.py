"""Seed ensembles in one program: ``--config.ensemble=N`` trains N decompositions of one target.

Member ``i`` is the run of ``seed + i``: its own init, data and mask keys (:class:`RunKeys` of its
seed), the same target. The train step of one run is ``vmap``-ed over the members' stacked train
states and keys and compiled once, so N small decompositions cost one dispatch per step instead
of N (what a sweep on an accelerator needs; on a CPU the work is the same N-fold).
Each member equals, to float tolerance, the run of its seed made alone (tests).

``--config.ensemble_sweep="losses.importance_minimality.coeff=1e-3,3e-3,1e-2"`` makes the members
every (value, seed) pair: a coefficient sweep as one program. Members that share a value share
one step function (vmapped or mapped over their seeds); the groups run one after another inside
the same compiled program.

The workdir holds the ensemble (``config.json``, one checkpoint of all members, the lock) and one
directory per member, ``seed_<s>/`` (``seed_<s>_<key>=<value>/`` in a sweep), with what a
single run writes: ``metrics.jsonl`` (and TensorBoard / W&B when asked for), ``summary.json``
and ``figures/``. ``ensemble.json`` lists the members' headline numbers. A stopped ensemble resumes from its last checkpoint like a single run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from spdjax import configs as config_lib
from spdjax.training import loop, writers, workdir as wd
from spdjax.training.checkpoints import Checkpointer
from spdjax.training.health import check_health
from spdjax.training.interrupts import StopRequest
from spdjax.training.progress import Progress
from spdjax.training.step import TrainState, make_train_step
from spdjax.training.validation import validate

log = logging.getLogger("spdjax")


@dataclasses.dataclass(frozen=True)
class Member:
    """One decomposition of an ensemble: its seed and, in a sweep, its value of the swept key."""

    seed: int
    value: float | None = None

    def label(self, key: str) -> str:
        base = f"seed_{self.seed}"
        return base if self.value is None else f"{base}_{key}={self.value:g}"


@dataclasses.dataclass(eq=False)
class Ensemble:
    """N runs of one config trained as one program (``state`` stacked along axis 0)."""

    config: object  # the ensemble's config (each member's: member_config)
    runs: dict  # swept value (None: no sweep) -> the run of that value's first member
    members: list[Member]
    state: TrainState
    keys: jax.Array  # [N] train keys
    workdir: pathlib.Path | None
    target_params: object  # on the default device, as the stacked state
    checkpointer: Checkpointer | None = None
    member_writers: list = dataclasses.field(default_factory=list)
    histories: list = dataclasses.field(default_factory=list)
    step_fns: dict = dataclasses.field(default_factory=dict)
    wall_time_s: float = 0.0
    lock: object = None

    @property
    def base(self) -> loop.Run:
        return self.runs[self.members[0].value]

    @property
    def seeds(self) -> list[int]:
        return [m.seed for m in self.members]

    @property
    def step(self) -> int:
        return int(self.state.step[0])

    def member_dir(self, i: int) -> pathlib.Path | None:
        if self.workdir is None:
            return None
        return self.workdir / self.members[i].label(sweep_key(self.config))

    def member_state(self, i: int) -> TrainState:
        return jax.tree.map(lambda x: x[i], self.state)


def sweep_key(config) -> str:
    return config.ensemble_sweep.split("=")[0] if config.ensemble_sweep else ""


def parse_sweep(config) -> tuple[str, list[float]]:
    """``("dotted.key", [values])`` of ``config.ensemble_sweep`` (``("", [])`` if none); a
    clear error for a malformed sweep, an unknown key or a non-numeric field."""
    text = config.ensemble_sweep
    if not text:
        return "", []
    key, eq, values = text.partition("=")
    try:
        parsed = [float(v) for v in values.split(",")] if eq and values else []
    except ValueError:
        parsed = []
    if not parsed:
        raise ValueError(f"ensemble_sweep must be 'dotted.key=v1,v2,...' with numbers, got "
                         f"{text!r}.")
    node = config
    for part in key.split("."):
        if part not in node:
            raise ValueError(f"ensemble_sweep: the config has no field {key!r}.")
        node = node[part]
    if not isinstance(node, float):
        raise ValueError(f"ensemble_sweep: {key!r} is {node!r}; only float fields (loss "
                         "coefficients, lr, ...) can be swept, as every member must have the "
                         "same shapes.")
    return key, parsed


def member_config(config, member: Member):
    """The config of the single run an ensemble member equals."""
    key, _ = parse_sweep(config)
    c = config.copy_and_resolve_references()
    c.seed, c.ensemble, c.ensemble_sweep = member.seed, 1, ""
    if key:
        *parents, leaf = key.split(".")
        node = c
        for part in parents:
            node = node[part]
        node[leaf] = float(member.value)
    return c


def setup(config, workdir: str | pathlib.Path | None = None, *, fresh: bool = False,
          allow_changes: tuple[str, ...] = ()) -> Ensemble:
    """Builds (or resumes from ``workdir``'s latest good checkpoint) the ensemble of ``config``."""
    validate(config)
    if jax.process_count() > 1:
        raise ValueError("ensemble > 1 runs in one process; run the seeds of a multi-process "
                         "run one after another.")
    key, values = parse_sweep(config)
    members = [Member(config.seed + i, v) for v in (values or [None])
               for i in range(config.ensemble)]
    lock = None
    if workdir is not None:
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        lock = wd.WorkdirLock(workdir)
    try:
        if workdir is not None:
            wd.prepare(workdir, config_lib.to_dict(config), fresh=fresh,
                       allow_changes=tuple(allow_changes))
        runs = {}  # in memory: the members' own directories are written here
        for m in members:
            if m.value not in runs:
                runs[m.value] = loop.setup(member_config(config, m))
        states = [loop.initial_state(runs[m.value], loop.RunKeys.from_seed(m.seed).init)
                  for m in members]
        host = [jax.device_get(s) for s in states]
        state = _on_default_device(jax.tree.map(lambda *xs: np.stack(xs), *host))
        keys = jnp.stack([loop.RunKeys.from_seed(m.seed).train for m in members])
        ens = Ensemble(config=config, runs=runs, members=members, state=state, keys=keys,
                       workdir=workdir,
                       target_params=_on_default_device(runs[members[0].value].target_params),
                       histories=[[] for _ in members], lock=lock)
        start = 0
        if workdir is not None:
            ens.checkpointer = Checkpointer(workdir / "checkpoints")
            restored, start = ens.checkpointer.restore_latest_valid(
                ens.state, quarantine=workdir / "damaged")
            if start:
                ens.state = _on_default_device(restored)
                log.info("Resuming the ensemble from the checkpoint at step %d.", start)
                ens.wall_time_s = float(ens.checkpointer.read_meta(start).get("wall_time_s", 0))
            for i, m in enumerate(members):
                member = ens.member_dir(i)
                member.mkdir(exist_ok=True)
                if start < config.steps:
                    (member / "summary.json").unlink(missing_ok=True)
                ens.member_writers.append(writers.make_writer(
                    member_config(config, m), member, start if start else None))
        else:
            ens.member_writers = [wd.MemoryWriter() for _ in members]
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return ens


def ensemble_mode(config) -> str:
    """``config.ensemble_mode``, with ``auto`` resolved: ``vmap`` (the members as one batched
    step) on an accelerator, ``map`` (one after another inside the program) on a CPU, where the
    batched step measured 3.4x slower than the members run in turn
    (``python -m benchmarks.ensemble``: benchmarks/results/ensemble_tms_5-2.md)."""
    mode = config.ensemble_mode
    if mode == "auto":
        return "map" if jax.devices()[0].platform == "cpu" else "vmap"
    return mode


def _on_default_device(tree):
    """Host copies as uncommitted device arrays: the ensemble runs on one device, whatever mesh
    the base run's arrays were laid out on."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)


def _group_step(run, k: int, mode: str):
    """One value's members: the run's K-step train step vmapped or mapped over them."""
    c = run.config
    one = make_train_step(run.method.objective, run.method.optimizer, run.experiment.batch_fn,
                          total_steps=c.steps, donate=False, microbatches=c.microbatches,
                          matmul_precision=c.matmul_precision, steps_per_call=k)
    if mode == "vmap":  # one batched step over the members
        # metrics of K > 1 steps come out [K, N, ...]: step-major, as a single run's
        return jax.vmap(one, in_axes=(0, None, 0), out_axes=(0, 0 if k == 1 else 1))

    def step(states, target_params, keys):  # one after another inside the program
        states, metrics = jax.lax.map(lambda sk: one(sk[0], target_params, sk[1]),
                                      (states, keys))
        if k > 1:
            metrics = jax.tree.map(lambda m: jnp.swapaxes(m, 0, 1), metrics)
        return states, metrics
    return step


def _step_fn(ens: Ensemble, k: int):
    """All members' K-step train step as one jitted program: each swept value's group of members
    through its own step, the groups in turn (members are stored value-major)."""
    if k not in ens.step_fns:
        mode = ensemble_mode(ens.config)
        groups = []  # (value, first member index, last + 1)
        for i, m in enumerate(ens.members):
            if groups and groups[-1][0] == m.value:
                groups[-1][2] = i + 1
            else:
                groups.append([m.value, i, i + 1])
        steps = [(_group_step(ens.runs[v], k, mode), a, b) for v, a, b in groups]
        axis = 0 if k == 1 else 1

        def step(states, target_params, keys):
            outs = [fn(jax.tree.map(lambda x, a=a, b=b: x[a:b], states), target_params, keys[a:b])
                    for fn, a, b in steps]
            if len(outs) == 1:
                return outs[0]
            new_states = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[o[0] for o in outs])
            metrics = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis),
                                   *[o[1] for o in outs])
            return new_states, metrics

        ens.step_fns[k] = jax.jit(step, donate_argnums=(0,))
    return ens.step_fns[k]


def train(ens: Ensemble, until_step: int | None = None) -> Ensemble:
    """Trains every member to ``until_step`` (default ``config.steps``): metric lines per member
    every ``log_every`` steps, health checks, a checkpoint every ``checkpoint_every`` and at the
    end; Ctrl-C stops at the next step boundary after a checkpoint."""
    c = ens.config
    until = c.steps if until_step is None else int(until_step)
    step = ens.step
    if step >= until:
        return ens
    t0 = time.perf_counter()
    progress = Progress(c.steps, step, label=f"ensemble of {len(ens.members)}")
    first = True
    with StopRequest() as interrupt:
        while step < until:
            end = min(until, (step // c.steps_per_call + 1) * c.steps_per_call)
            ens.state, per_step = _step_fn(ens, end - step)(ens.state, ens.target_params,
                                                            ens.keys)
            if end - step == 1:
                per_step = jax.tree.map(lambda m: m[None], per_step)
            if first:
                jax.block_until_ready(ens.state)
                log.info("Compiled the ensemble step in %.1fs.", time.perf_counter() - t0)
                progress.mark(end)
                first = False
            step = end
            log_now = step % c.log_every == 0 or step == until
            save_now = ens.checkpointer is not None and (
                step % c.checkpoint_every == 0 or interrupt.requested or step in (until, c.steps))
            if log_now or save_now:
                metrics = jax.device_get(jax.tree.map(lambda m: m[-1], per_step))
                lines = [wd.flatten_metrics(jax.tree.map(lambda m, i=i: m[i], metrics))
                         for i in range(len(ens.members))]
                for i, values in enumerate(lines):
                    try:
                        check_health(c, ens.checkpointer, step, values,
                                     ens.member_state(i).params, ens.histories[i])
                    except Exception as e:
                        raise type(e)(f"Ensemble member {ens.members[i].label(sweep_key(c))}: "
                                      f"{e}") from e
            if save_now:
                ens.checkpointer.save(step, ens.state, {
                    "method": ens.base.method.name, "config": config_lib.to_dict(c),
                    "members": [m.label(sweep_key(c)) for m in ens.members],
                    "wall_time_s": ens.wall_time_s + time.perf_counter() - t0})
            if log_now:
                rate = progress.mark(step)
                for i, values in enumerate(lines):
                    schedule = ens.runs[ens.members[i].value].schedule
                    values["lr"] = max(float(schedule(step - 1)), 0.0)
                    values["steps_per_sec"] = rate
                    values["wall_time_s"] = ens.wall_time_s + time.perf_counter() - t0
                    ens.member_writers[i].write_scalars(step, values)
                    ens.member_writers[i].flush()
                progress.report(step, float(np.mean([v["loss/total"] for v in lines])))
            if interrupt.requested:
                raise KeyboardInterrupt
    ens.wall_time_s += time.perf_counter() - t0
    if ens.checkpointer is not None:
        ens.checkpointer.wait()
    return ens


def member_run(ens: Ensemble, i: int) -> loop.Run:
    """Member ``i`` as a :class:`~spdjax.training.loop.Run` (its config, keys, state, directory):
    ``loop.evaluate`` / ``loop.plot`` treat it as the run it equals."""
    m = ens.members[i]
    return dataclasses.replace(
        ens.runs[m.value], config=member_config(ens.config, m),
        keys=loop.RunKeys.from_seed(m.seed), state=ens.member_state(i),
        workdir=ens.member_dir(i), writer=ens.member_writers[i], checkpointer=None, lock=None,
        wall_time_s=ens.wall_time_s, init_record=None)


def evaluate(ens: Ensemble, *, figures: bool | None = None) -> list[dict]:
    """Every member's summary (``summary.json`` and figures in its directory) and
    ``ensemble.json`` with their headline numbers."""
    figures = ens.config.figures if figures is None else figures
    key = sweep_key(ens.config)
    summaries = []
    for i, m in enumerate(ens.members):
        run = member_run(ens, i)
        log.info("Member %s:", m.label(key))
        summary = loop.evaluate(run)
        if figures and run.workdir is not None:
            run.writer.write_images(run.step, [p for p in loop.plot(run) if p.suffix == ".png"])
        summaries.append(summary)
    if ens.workdir is not None:
        table = {m.label(key): {"seed": m.seed, **({key: m.value} if key else {}),
                                **{k: v for k, v in summ.items() if isinstance(v, (int, float))
                                   and not isinstance(v, bool) and math.isfinite(v)}}
                 for m, summ in zip(ens.members, summaries)}
        wd.write_atomic(ens.workdir / "ensemble.json",
                        json.dumps({"seeds": sorted(set(ens.seeds)), "sweep": key,
                                    "members": table}, indent=2) + "\n")
    return summaries


def close(ens: Ensemble) -> None:
    """Waits for the checkpoint, closes the members' files and releases the workdir."""
    loop.release(ens.checkpointer, ens.member_writers, ens.lock)


def train_and_evaluate(config, workdir, *, fresh: bool = False,
                       allow_changes: tuple[str, ...] = ()) -> list[dict]:
    """The CLI's path for ``config.ensemble > 1``: the members' summaries."""
    ens = setup(config, workdir, fresh=fresh, allow_changes=allow_changes)
    try:
        train(ens)
        return evaluate(ens)
    finally:
        close(ens)
