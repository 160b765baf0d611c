"""Self-describing checkpoints of a train state, via orbax, behind one small interface.

Each checkpoint step holds two items:

* ``state``: every array of the train state under its *name*, the path of the leaf in the state
  pytree (``params.components.linear1.V``, ``opt_state.0.mu.ci.linear1.0.w``, ``step``; ``%``,
  ``.`` and ``/`` in names are escaped as ``%25``, ``%2E``, ``%2F``, so site names never become
  file paths);
* ``meta``: JSON with the format version, the step, the leaf names, and what the writer adds (the
  loop adds the method and the run's resolved config), so a checkpoint can be read without the
  code or config object that wrote it.

Restoring into a template matches arrays by name, not position: adding, removing or reordering
state fields fails with the names that differ instead of loading the wrong arrays.
:meth:`Checkpointer.restore_arrays` reads a checkpoint without any template (for analysis).
Format 0 (before spdjax 0.2: a positional list of leaves, no ``meta``) is still restored into a
template of the same structure.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT_VERSION = 1
log = logging.getLogger("spdjax")


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def _unescape(part: str) -> str:
    return part.replace("%2F", "/").replace("%2E", ".").replace("%25", "%")


def _part(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return _escape(str(getattr(key, attr)))
    raise TypeError(f"Unsupported pytree key {key!r}.")


def leaf_names(tree: Any) -> list[str]:
    """The checkpoint name of every leaf of ``tree``, in flattening order."""
    return [".".join(_part(k) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def unflatten_names(flat: dict[str, Any]) -> dict:
    """``{"a.b.0": x}`` -> ``{"a": {"b": {"0": x}}}`` (names unescaped; list indices stay keys)."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = [_unescape(p) for p in name.split(".")]
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


class CheckpointFormatError(ValueError):
    """A checkpoint does not fit the state it is restored into."""


class CheckpointVersionError(CheckpointFormatError):
    """A checkpoint written by a newer spdjax, in a format this one does not read."""


class CheckpointDamagedError(RuntimeError):
    """A checkpoint's files are missing, truncated or unreadable."""


_quiet = False


def _quiet_late_callbacks() -> None:
    """When a read fails, tensorstore's pending reads call back into orbax's finished asyncio
    loop and Python prints each "Event loop is closed" as a raw traceback (dozens of them):
    harmless, and the failure itself is reported once; those (only those) are silenced."""
    global _quiet
    if _quiet:
        return
    _quiet, previous = True, sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)
    sys.unraisablehook = hook


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0][:200] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Checkpointer:
    """Saves and restores train states under ``directory`` keyed by step (keeps the last
    ``keep``)."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        """Writes ``state`` by leaf name, with ``meta`` (e.g. ``{"config": ..., "method":
        ...}``)."""
        names = leaf_names(state)
        flat = dict(zip(names, jax.tree.leaves(state)))
        meta = {"format_version": FORMAT_VERSION, "step": int(step), **(meta or {}),
                "names": names, "shapes": [list(np.shape(x)) for x in flat.values()]}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)))

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        return step

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def _format(self, step: int) -> int:
        path = self.directory / str(step)
        if (path / "meta").is_dir():
            return 1
        if (path / "default").is_dir():
            return 0
        raise CheckpointDamagedError(f"{path} holds neither a format-1 nor a format-0 checkpoint "
                                     f"(contents: {sorted(p.name for p in path.iterdir())}).")

    def read_meta(self, step: int | None = None) -> dict:
        """The ``meta`` item of a checkpoint (``{"format_version": 0}`` for a format-0 one)."""
        step = self._step(step)
        if self._format(step) == 0:
            return {"format_version": 0, "step": step}
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args).meta

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Restores into the structure (and shardings) of ``template``, matching arrays by name."""
        step = self._step(step)
        _quiet_late_callbacks()
        leaves, treedef = jax.tree.flatten(template)
        abstract = [ocp.utils.to_shape_dtype_struct(x) for x in leaves]
        if self._format(step) == 0:
            log.warning("Checkpoint %s/%d has format 0 (positional leaves); restoring by position.",
                        self.directory, step)
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
            return jax.tree.unflatten(treedef, restored)
        names = leaf_names(template)
        meta = self.read_meta(step)
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointVersionError(
                f"Checkpoint {self.directory}/{step} has format {meta['format_version']}, newer "
                f"than this spdjax reads ({FORMAT_VERSION}); upgrade spdjax.")
        saved = set(meta["names"])
        missing, extra = sorted(set(names) - saved), sorted(saved - set(names))
        if missing or extra:
            raise CheckpointFormatError(
                f"Checkpoint {self.directory}/{step} does not fit this run's state: missing "
                f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                f"{extra[:8]}{' ...' if len(extra) > 8 else ''}.")
        shapes = self.saved_shapes(step, meta)
        differ = [f"{n} {shapes[n]} -> {tuple(x.shape)}" for n, x in zip(names, abstract)
                  if n in shapes and shapes[n] != tuple(x.shape)]
        if differ:
            raise CheckpointFormatError(
                f"Checkpoint {self.directory}/{step} does not fit this run's state: other shapes "
                f"({'; '.join(differ[:4])}{' ...' if len(differ) > 4 else ''}).")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(dict(zip(names, abstract))))).state
        return jax.tree.unflatten(treedef, [restored[n] for n in names])

    def saved_shapes(self, step: int, meta: dict | None = None) -> dict[str, tuple]:
        """``{name: shape}`` of a format-1 checkpoint's arrays: from its ``meta`` (written since
        the shapes were recorded), else from orbax's array metadata ({} if that is unreadable:
        restoring then says what is wrong)."""
        meta = self.read_meta(step) if meta is None else meta
        if "shapes" in meta:
            return {n: tuple(s) for n, s in zip(meta["names"], meta["shapes"])}
        try:
            tree = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            return {n: tuple(m.shape) for n, m in tree.items()}
        except Exception:  # noqa: BLE001 - damaged: the restore reports it
            return {}

    def restore_arrays(self, step: int | None = None, *, unflatten: bool = True) -> dict:
        """A checkpoint's arrays without a template: nested dicts by name (or flat by name)."""
        step = self._step(step)
        _quiet_late_callbacks()
        if self._format(step) == 0:
            raise CheckpointFormatError(
                f"Checkpoint {self.directory}/{step} has format 0 (positional leaves, no names): "
                "restore it into a template with restore(), e.g. by resuming the run.")
        flat = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore())).state
        return unflatten_names(flat) if unflatten else flat

    def restore_subtree(self, template: Any, prefix: str, step: int | None = None) -> Any:
        """The part of a checkpoint under ``prefix`` (e.g. ``"params"``), shaped like ``template``
        (whose arrays may be ``jax.ShapeDtypeStruct``s): no optimizer state template needed."""
        flat = self.restore_arrays(step, unflatten=False)
        names = [f"{prefix}.{n}" for n in leaf_names(template)]
        missing = [n for n in names if n not in flat]
        if missing:
            raise CheckpointFormatError(f"Checkpoint {self.directory} has no arrays {missing[:8]}.")
        return jax.tree.unflatten(jax.tree.structure(template), [flat[n] for n in names])

    def restore_latest_valid(self, template: Any, *, quarantine: pathlib.Path) -> tuple[Any, int]:
        """The newest checkpoint that restores into ``template``: ``(state, step)``, or
        ``(None, 0)`` if there is none. Damaged ones newer than it (missing, truncated or garbled
        files, empty step directories) are moved to ``quarantine`` with a one-line warning each,
        so that nothing is deleted and a later save of the same step does not collide with them.
        A checkpoint that reads but does not fit the template is not damage: that raises
        :class:`CheckpointFormatError`. When every checkpoint is damaged, nothing is moved and
        :class:`CheckpointDamagedError` says so (a run must not silently restart at step 0)."""
        failed: list[tuple[int, Exception]] = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(template, step)
            except CheckpointFormatError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read is damage
                failed.append((step, e))
                continue
            for bad, e in failed:
                quarantine.mkdir(parents=True, exist_ok=True)
                target = quarantine / f"{bad}_{int(time.time())}"
                shutil.move(str(self.directory / str(bad)), target)
                log.warning("Checkpoint %s/%d is damaged (%s); moved to %s, resuming from the "
                            "one before.", self.directory, bad, _reason(e), target)
            if failed:
                self._reopen()  # forget the moved steps
            return state, step
        if failed:
            raise CheckpointDamagedError(
                f"Every checkpoint in {self.directory} is damaged ("
                + "; ".join(f"step {s}: {_reason(e)}" for s, e in failed)
                + "); nothing was moved or restarted.")
        return None, 0

    def move_aside(self, step: int, folder: pathlib.Path, why: str) -> pathlib.Path:
        """Moves checkpoint ``step`` to ``folder/<step>_<why>_<time>`` (nothing is deleted; a
        later save of the same step does not collide with it) and forgets it."""
        self.wait()
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{step}_{why}_{int(time.time())}"
        shutil.move(str(self.directory / str(step)), target)
        self._reopen()
        return target

    def _reopen(self) -> None:
        self._manager.close()
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
