"""Ensembles: N decompositions of one target as one program, a run with a member axis.

Member ``i`` is the run of its own config (its seed; in a sweep, its value of the swept field):
its own init, data and mask keys (:class:`~spdjax.training.loop.RunKeys` of its seed), the same
target. The train step of one run is ``vmap``-ed (or ``lax.map``-ped) over the members' stacked
train states, keys and hparams and compiled once, so N small decompositions cost one dispatch
per step instead of N. Members whose configs differ only in the method's hparams (its loss
coefficients, :attr:`spdjax.methods.base.Method.config_hparams`) share one traced step: a
coefficient sweep of N values x S seeds is one step function. Members that differ in anything
else (e.g. ``lr``) are grouped, each group through its own step inside the same program. The
stepping loop is the single run's (:func:`spdjax.training.stepping.advance`). Each member equals,
to float tolerance, the run of its config made alone (tests).

The members come as values (:class:`Member`: label, seed, config); the config layer makes them
from ``config.ensemble`` / ``config.ensemble_sweep`` (:mod:`spdjax.config.sweeps`).

The workdir holds the ensemble (``config.json``, one checkpoint of all members, the lock) and one
directory per member, named by its label (``seed_<s>/``, ``seed_<s>_<key>=<value>/`` in a
sweep), with what a single run writes: ``metrics.jsonl`` (and TensorBoard / W&B when asked for),
``summary.json`` and ``figures/``. ``ensemble.json`` lists the members' headline numbers. A
stopped ensemble resumes from its last checkpoint like a single run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from spdjax.core.decomposition import traced_input_checks
from spdjax.methods.base import MethodSpec
from spdjax.training import loop, writers, workdir as wd
from spdjax.training.checkpoints import Checkpointer
from spdjax.training.family import Family
from spdjax.training.health import DivergenceError
from spdjax.training.interrupts import StopRequest
from spdjax.training.progress import Progress
from spdjax.training.step import TrainState, make_train_step
from spdjax.training.stepping import advance, one_per_step, writer_sink

log = logging.getLogger("spdjax")


@dataclasses.dataclass(frozen=True)
class Member:
    """One decomposition of an ensemble: its directory name, seed and the config of the single
    run it equals."""

    label: str
    seed: int
    config: Any


@dataclasses.dataclass(eq=False)
class Ensemble:
    """N runs trained as one program (``state`` stacked along axis 0)."""

    config: Any  # the ensemble's config (each member's: members[i].config)
    members: list[Member]
    groups: list[tuple[loop.Run, int, int]]  # (the group's first run, first index, last + 1)
    state: TrainState
    keys: jax.Array  # [N] train keys
    hparams: Any  # {name: [N]} stacked hparams, or None
    workdir: pathlib.Path | None
    target_params: Any  # on the default device, as the stacked state
    checkpointer: Checkpointer | None = None
    member_writers: list = dataclasses.field(default_factory=list)
    histories: list = dataclasses.field(default_factory=list)
    step_fns: dict = dataclasses.field(default_factory=dict)
    wall_time_s: float = 0.0
    lock: Any = None
    compiled: bool = False
    closed: bool = False  # close() released the workdir: no more training
    pending_checks: list = dataclasses.field(default_factory=list)  # (input checks, step)

    @property
    def base(self) -> loop.Run:
        return self.groups[0][0]

    @property
    def seeds(self) -> list[int]:
        return [m.seed for m in self.members]

    @property
    def step(self) -> int:
        return int(self.state.step[0])

    def member_dir(self, i: int) -> pathlib.Path | None:
        return None if self.workdir is None else self.workdir / self.members[i].label

    def member_state(self, i: int) -> TrainState:
        return jax.tree.map(lambda x: x[i], self.state)

    def group_of(self, i: int) -> loop.Run:
        return next(run for run, a, b in self.groups if a <= i < b)

    # -- what the stepping loop needs (spdjax.training.stepping.Steppable) ---------------------
    def step_call(self, n: int):
        fn = _step_fn(self, n)

        def call(state):
            (state, per_step), err = fn(state, self.target_params, self.keys, self.hparams)
            self.pending_checks.append((err, jnp.copy(state.step[0])))  # read at log steps
            return state, one_per_step(per_step, n)
        return call

    def check_inputs(self) -> None:
        """Raises ``ValueError`` naming the step if a member's batch since the last call had bad
        input (the members' input checks, read here rather than after every call)."""
        pending, self.pending_checks = self.pending_checks, []
        for err, step in pending:
            message = err.get()
            if message is not None:
                raise ValueError(f"Bad input by step {int(step)}: "
                                 f"{message.split(' (`check` failed)')[0]} The data the run "
                                 "trains on is invalid (see the family's batch function); "
                                 "nothing of this step was saved.")

    def member_metrics(self, metrics: dict) -> list[dict]:
        return [wd.flatten_metrics(jax.tree.map(lambda m, i=i: m[i], metrics))
                for i in range(len(self.members))]

    def member_params(self, state: TrainState, i: int) -> Any:
        return jax.tree.map(lambda x: x[i], state.params)

    def member_label(self, i: int) -> str:
        return self.members[i].label

    def lr(self, i: int, step: int) -> float:
        return float(self.group_of(i).schedule(step))

    def checkpoint_meta(self, wall_time_s: float) -> dict:
        return {"method": self.base.method.name, "config": wd.config_dict(self.config),
                "members": [m.label for m in self.members], "wall_time_s": wall_time_s,
                "target_sha256": self.base.target_fingerprint}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a config dict's fields by dotted key)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _group_key(member: Member, hparam_keys: Sequence[str]) -> str:
    """What must be equal for two members to share a step: their config without the seed and
    the method's hparams."""
    flat = _flat(wd.config_dict(member.config))
    for key in ("seed", *hparam_keys):
        flat.pop(key, None)
    return json.dumps(flat, sort_keys=True, default=str)


def setup(config, members: Sequence[Member], workdir: str | pathlib.Path | None = None, *,
          family: Family, method: MethodSpec, fresh: bool = False,
          allow_changes: tuple[str, ...] = (), upgrade_record=None) -> Ensemble:
    """Builds (or resumes from ``workdir``'s latest good checkpoint) the ensemble of
    ``members`` (``config``: the ensemble's own config, recorded in the workdir)."""
    if jax.process_count() > 1:
        raise ValueError("An ensemble runs in one process; run the seeds of a multi-process "
                         "run one after another.")
    if not members:
        raise ValueError("An ensemble needs at least one member.")
    labels = [m.label for m in members]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Ensemble member labels must be unique; got {labels}.")
    lock, workdir, changes = loop.open_workdir(config, workdir, fresh=fresh,
                                               allow_changes=allow_changes,
                                               upgrade=upgrade_record)
    try:
        first = loop.setup(members[0].config, family=family, method=method)  # in memory
        hparam_keys = tuple(first.method.config_hparams)
        runs = {_group_key(members[0], hparam_keys): first}
        groups: list[tuple[loop.Run, int, int]] = []
        for i, m in enumerate(members):
            key = _group_key(m, hparam_keys)
            if key not in runs:
                runs[key] = loop.setup(m.config, family=family, method=method)
            if groups and groups[-1][0] is runs[key]:
                groups[-1] = (runs[key], groups[-1][1], i + 1)
            else:
                groups.append((runs[key], i, i + 1))
        states, hparams = [], []
        for i, m in enumerate(members):
            run = next(r for r, a, b in groups if a <= i < b)
            states.append(jax.device_get(
                loop.initial_state(run, loop.RunKeys.from_seed(m.seed).init)))
            hparams.append(run.method.hparams_of(m.config))
        state = _on_default_device(jax.tree.map(lambda *xs: np.stack(xs), *states))
        stacked = (None if not hparams[0] else
                   {k: jnp.asarray([h[k] for h in hparams], jnp.float32) for k in hparams[0]})
        keys = jnp.stack([loop.RunKeys.from_seed(m.seed).train for m in members])
        ens = Ensemble(config=config, members=list(members), groups=groups, state=state,
                       keys=keys, hparams=stacked, workdir=workdir,
                       target_params=_on_default_device(groups[0][0].target_params),
                       histories=[[] for _ in members], lock=lock)
        _resume(ens, changes)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return ens


def _resume(ens: Ensemble, changes: list = ()) -> None:
    """Restores the newest good checkpoint (:func:`spdjax.training.loop.restore`: a checkpoint
    that does not fit, or of another target, is refused with nothing written), records the
    start and opens every member's directory and writer."""
    if ens.workdir is None:
        ens.member_writers = [wd.MemoryWriter() for _ in ens.members]
        return
    ens.checkpointer = Checkpointer(ens.workdir / "checkpoints")
    try:
        restored, start = loop.restore(ens.checkpointer, ens.state, ens.workdir,
                                       fingerprint=ens.base.target_fingerprint,
                                       target_source=ens.base.target_source)
    except BaseException:
        ens.checkpointer.close()
        raise
    wd.record_start(ens.workdir, wd.config_dict(ens.config), list(changes), start)
    if start:
        ens.state = _on_default_device(restored)
        log.info("Resuming the ensemble from the checkpoint at step %d.", start)
        ens.wall_time_s = float(ens.checkpointer.read_meta(start).get("wall_time_s", 0))
    for i, m in enumerate(ens.members):
        member = ens.member_dir(i)
        member.mkdir(exist_ok=True)
        if start < ens.config.steps:
            (member / "summary.json").unlink(missing_ok=True)
        ens.member_writers.append(writers.make_writer(m.config, member, start if start else None))


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


def _group_step(run: loop.Run, k: int, mode: str):
    """One group's members: the run's K-step train step vmapped or mapped over them."""
    c = run.config
    one = make_train_step(run.method.objective, run.method.optimizer, run.experiment.batch_fn,
                          total_steps=c.steps, donate=False, microbatches=c.microbatches,
                          matmul_precision=c.matmul_precision, steps_per_call=k,
                          input_checks=False)  # the whole program is checked (_step_fn)
    if mode == "vmap":  # one batched step over the members
        # metrics of K > 1 steps come out [K, N, ...]: step-major, as a single run's
        return jax.vmap(one, in_axes=(0, None, 0, 0), out_axes=(0, 0 if k == 1 else 1))

    def step(states, target_params, keys, hparams):  # one after another inside the program
        states, metrics = jax.lax.map(lambda s: one(s[0], target_params, s[1], s[2]),
                                      (states, keys, hparams))
        if k > 1:
            metrics = jax.tree.map(lambda m: jnp.swapaxes(m, 0, 1), metrics)
        return states, metrics
    return step


def _step_fn(ens: Ensemble, k: int):
    """All members' K-step train step as one jitted program: each group of members through its
    own step, the groups in turn."""
    if k not in ens.step_fns:
        mode = ensemble_mode(ens.config)
        steps = [(_group_step(run, k, mode), a, b) for run, a, b in ens.groups]
        axis = 0 if k == 1 else 1

        def step(states, target_params, keys, hparams):
            def part(tree, a, b):
                return jax.tree.map(lambda x: x[a:b], tree)
            outs = [fn(part(states, a, b), target_params, keys[a:b], part(hparams, a, b))
                    for fn, a, b in steps]
            if len(outs) == 1:
                return outs[0]
            new_states = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[o[0] for o in outs])
            metrics = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=axis),
                                   *[o[1] for o in outs])
            return new_states, metrics

        def checked(states, target_params, keys, hparams):  # input checks of every member
            with traced_input_checks():
                err, out = checkify.checkify(step, errors=checkify.user_checks)(
                    states, target_params, keys, hparams)
            return out, err

        ens.step_fns[k] = jax.jit(checked, donate_argnums=(0,))
    return ens.step_fns[k]


def train(ens: Ensemble, until_step: int | None = None) -> Ensemble:
    """Trains every member to ``until_step`` (default ``config.steps``) with the one stepping
    loop: metric lines per member every ``log_every`` steps, health checks, a checkpoint every
    ``checkpoint_every`` and at the end; Ctrl-C stops at the next step boundary after a
    checkpoint."""
    c = ens.config
    if ens.closed:
        raise RuntimeError("This ensemble is closed (close() released its workdir and files); "
                           "set it up again to continue (it resumes from its checkpoint).")
    until = c.steps if until_step is None else int(until_step)
    if ens.step >= until:
        return ens
    t0 = time.perf_counter()
    with StopRequest() as interrupt:
        ens.state = advance(ens, ens.state, stop=until,
                            progress=Progress(c.steps, ens.step,
                                              label=f"ensemble of {len(ens.members)}"),
                            sinks=[writer_sink(w) for w in ens.member_writers],
                            checkpoint=ens.checkpointer is not None, on_step=None, t0=t0,
                            histories=ens.histories, interrupt=interrupt)
    ens.wall_time_s += time.perf_counter() - t0
    if ens.checkpointer is not None:
        ens.checkpointer.wait()
    return ens


def member_run(ens: Ensemble, i: int) -> loop.Run:
    """Member ``i`` as a :class:`~spdjax.training.loop.Run` (its config, keys, state, directory):
    ``loop.evaluate`` / ``loop.plot`` treat it as the run it equals."""
    m = ens.members[i]
    run = ens.group_of(i)
    if run.method.config_hparams:  # its own coefficients in the evaluation's objective
        run = dataclasses.replace(run, method=loop.build_method(run, m.config))
    return dataclasses.replace(
        run, config=m.config, keys=loop.RunKeys.from_seed(m.seed), state=ens.member_state(i),
        workdir=ens.member_dir(i), writer=ens.member_writers[i], checkpointer=None, lock=None,
        wall_time_s=ens.wall_time_s, init_record=None)


def evaluate(ens: Ensemble, *, figures: bool | None = None) -> list[dict]:
    """Every member's summary (``summary.json`` and figures in its directory) and
    ``ensemble.json`` with their headline numbers."""
    figures = ens.config.figures if figures is None else figures
    summaries = []
    for i, m in enumerate(ens.members):
        run = member_run(ens, i)
        log.info("Member %s:", m.label)
        try:
            summary = loop.evaluate(run)
        except DivergenceError as e:
            raise DivergenceError(f"Ensemble member {m.label}: {e}") from e
        if figures and run.workdir is not None:
            run.writer.write_images(run.step, [p for p in loop.plot(run) if p.suffix == ".png"])
        summaries.append(summary)
    if ens.workdir is not None:
        swept = _swept_fields(ens.members)
        table = {m.label: {"seed": m.seed, **{k: _field(m.config, k) for k in swept},
                           **{k: v for k, v in summ.items() if isinstance(v, (int, float))
                              and not isinstance(v, bool) and math.isfinite(v)}}
                 for m, summ in zip(ens.members, summaries)}
        wd.write_atomic(ens.workdir / "ensemble.json",
                        json.dumps({"seeds": sorted(set(ens.seeds)), "sweep": ",".join(swept),
                                    "members": table}, indent=2) + "\n")
    return summaries


def _field(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _swept_fields(members: Sequence[Member]) -> list[str]:
    """The dotted config fields other than the seed in which the members differ."""
    flats = [_flat(wd.config_dict(m.config)) for m in members]
    keys = sorted(set().union(*flats) - {"seed"})
    return [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]


def close(ens: Ensemble) -> None:
    """Waits for the checkpoint, closes the members' files and releases the workdir;
    :func:`train` refuses a closed ensemble."""
    ens.closed = True
    loop.release(ens.checkpointer, ens.member_writers, ens.lock)


def train_and_evaluate(config, members: Sequence[Member], workdir, *, family: Family,
                       method: MethodSpec, fresh: bool = False,
                       allow_changes: tuple[str, ...] = (), upgrade_record=None) -> list[dict]:
    """Setup, train, evaluate and close: the members' summaries."""
    ens = setup(config, members, workdir, family=family, method=method, fresh=fresh,
                allow_changes=allow_changes, upgrade_record=upgrade_record)
    try:
        train(ens)
        return evaluate(ens)
    finally:
        close(ens)
