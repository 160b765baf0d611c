"""One pass over a stream of batches, resumable: the machinery of the dataset-wide analyses
(:mod:`~spdjax.analysis.harvest`, :mod:`~spdjax.analysis.dataset_attributions`).

An analysis is an accumulator state (a pytree of arrays) and a pure ``update(state, i, key) ->
state`` for batch ``i``; batch ``i`` draws its data and randomness from ``batch_key(seed, i)``
alone, so a pass that stops after batch ``j`` and resumes from the state saved there gives the
state an uninterrupted pass gives, bit for bit. :func:`accumulate` runs the loop (progress
callback, a save every ``save_every`` batches and at the end, and a save of the last finished
batch on ``KeyboardInterrupt``); :func:`save_state` / :func:`load_state` write and read a state
as one ``.npz`` (written atomically: a crash mid-write leaves the previous file) with a JSON
header of the settings it was made with, so a resume with other settings is refused;
:func:`resume_point` is the whole resume step of an analysis written to a directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
META = "__meta__"  # the npz entry holding the JSON header


def batch_key(seed: int, i: int) -> Array:
    """The PRNG key of batch ``i`` of a pass seeded with ``seed``: ``fold_in(key(seed), i)``
    (independent of where a pass was interrupted)."""
    return jax.random.fold_in(jax.random.key(seed), i)


def accumulate(update: Callable[[Any, int, Array], Any], state: Any, *, seed: int,
               n_batches: int, start: int = 0,
               save: Callable[[Any, int], None] | None = None, save_every: int = 0,
               report: Callable[[int, int, float], None] | None = None) -> Any:
    """``state`` after ``update(state, i, batch_key(seed, i))`` for ``i`` in ``[start,
    n_batches)``.

    ``save(state, done)`` is called every ``save_every`` batches (0: never in between), after
    the last batch, and with the last finished batch when a ``KeyboardInterrupt`` (Ctrl-C, or a
    SIGTERM turned into one) stops the loop, which then re-raises. ``report(done, n_batches,
    seconds since start)`` after every batch. ``update`` must not donate ``state``: on an
    interrupt the state before the unfinished batch is the one saved."""
    if not 0 <= start <= n_batches:
        raise ValueError(f"The pass is {n_batches} batches; cannot start at batch {start}.")
    if save_every < 0:
        raise ValueError(f"save_every must be >= 0 (0: only at the end); got {save_every}.")
    t0, done = time.perf_counter(), start
    try:
        for i in range(start, n_batches):
            new = update(state, i, batch_key(seed, i))
            jax.block_until_ready(new)
            state, done = new, i + 1
            if report is not None:
                report(done, n_batches, time.perf_counter() - t0)
            if save is not None and save_every and done % save_every == 0 and done < n_batches:
                save(state, done)
    except KeyboardInterrupt:
        if save is not None and done > start:
            save(state, done)
        raise
    if save is not None:
        save(state, done)
    return state


def _names(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in
            jax.tree_util.tree_flatten_with_path(tree)[0]]


def save_state(path: str | pathlib.Path, state: Any, meta: Mapping[str, Any]) -> pathlib.Path:
    """Writes ``state`` (its leaves by tree path) and ``meta`` (JSON-able) to ``path`` (an
    ``.npz``), atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree.leaves(state)
    arrays = {name: np.asarray(leaf) for name, leaf in zip(_names(state), leaves)}
    arrays[META] = np.asarray(json.dumps(dict(meta), sort_keys=True))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_meta(path: str | pathlib.Path) -> dict:
    """The JSON header of a state written by :func:`save_state`."""
    with np.load(path, allow_pickle=False) as f:
        if META not in f.files:
            raise ValueError(f"{path} is not an analysis state (no {META} entry).")
        return json.loads(str(f[META]))


def load_state(path: str | pathlib.Path, template: Any) -> tuple[Any, dict]:
    """``(state, meta)`` from ``path``: the arrays in the structure of ``template`` (a state of
    the same analysis, e.g. its initial one); a missing entry or another shape is a
    ``ValueError`` naming it."""
    with np.load(path, allow_pickle=False) as f:
        if META not in f.files:
            raise ValueError(f"{path} is not an analysis state (no {META} entry).")
        meta = json.loads(str(f[META]))
        leaves, tree = jax.tree.flatten(template)
        out = []
        for name, leaf in zip(_names(template), leaves):
            if name not in f.files:
                raise ValueError(f"{path} lacks the accumulator {name}: written by another "
                                 "analysis or version?")
            value = f[name]
            if value.shape != np.shape(leaf):
                raise ValueError(f"{path}: accumulator {name} has shape {value.shape}, expected "
                                 f"{np.shape(leaf)} (another run or other settings?).")
            out.append(value)
    return jax.tree.unflatten(tree, out), meta


def check_resumable(meta: Mapping[str, Any], settings: Mapping[str, Any], path) -> None:
    """A saved state may be continued only with the settings it was made with (``n_batches``
    aside, which may grow): a ``ValueError`` naming the fields that differ."""
    diff = {k: (meta.get(k), v) for k, v in settings.items()
            if k != "n_batches" and meta.get(k) != v}
    if diff:
        raise ValueError(f"{path} was made with other settings: " + ", ".join(
            f"{k} {a!r} (now {b!r})" for k, (a, b) in sorted(diff.items())) +
            "; pass the same settings to resume, or --fresh to start over.")


def resume_point(path: str | pathlib.Path | None, state: Any, settings: Mapping[str, Any], *,
                 n_batches: int, resume: bool = True
                 ) -> tuple[Any, int, Callable[[Any, int], None] | None]:
    """``(state, start, save)`` for a pass of ``n_batches`` that keeps its state at ``path``
    (None: in memory only; ``(state, 0, None)``).

    With ``resume`` and a state at ``path`` made with ``settings`` (:func:`check_resumable`),
    the saved state and its count of finished batches; else ``state`` and 0. ``save(state,
    done)`` writes ``settings`` with ``done`` and ``n_batches``. A saved state of more batches
    than ``n_batches`` is a ``ValueError``: it cannot be cut back, and continuing it under a
    smaller count would label it with fewer batches than it holds."""
    if path is None:
        return state, 0, None
    path = pathlib.Path(path)
    start = 0
    if resume and path.exists():
        check_resumable(read_meta(path), settings, path)
        saved, meta = load_state(path, state)
        done = int(meta["done"])
        if done > n_batches:
            raise ValueError(f"{path} holds {done} finished batches, more than the "
                             f"{n_batches} asked for: pass --batches >= {done} (n_batches >= "
                             f"{done}) to continue it, or --fresh (resume=False) to start over.")
        state, start = jax.tree.map(jnp.asarray, saved), done

    def save(state, done):
        save_state(path, state, dict(settings, done=done, n_batches=n_batches))

    return state, start, save


def load_result(path: str | pathlib.Path, *, subdir: str, filename: str, what: str,
                command: str, spec_type: type, init: Callable[[Any], Any]
                ) -> tuple[Any, dict, dict]:
    """``(spec, state, meta)`` of an analysis result saved with its spec in the header (key
    ``"spec"``): ``path`` is a run's workdir (reads ``analysis/<subdir>/<filename>``), that
    directory, or the file. ``init(spec)`` is the state's template; ``command`` the module
    that writes it (named in the ``FileNotFoundError``)."""
    path = pathlib.Path(path)
    for p in (path / "analysis" / subdir / filename, path / filename, path):
        if p.is_file():
            break
    else:
        raise FileNotFoundError(f"No {what} in {path}: run `python -m {command} "
                                f"--workdir={path}` first.")
    meta = read_meta(p)
    fields = meta.pop("spec")
    spec = spec_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    state, _ = load_state(p, init(spec))
    return spec, {k: np.asarray(v) for k, v in state.items()}, meta
