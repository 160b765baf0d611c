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
from typing import Any

import jax
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
    return [".".join(_part(k) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


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


class Checkpointer:
    """Saves and restores train states under ``directory`` keyed by step (keeps the last ``keep``)."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        """Writes ``state`` by leaf name, with ``meta`` (e.g. ``{"config": ..., "method": ...}``)."""
        names = leaf_names(state)
        flat = dict(zip(names, jax.tree.leaves(state)))
        meta = {"format_version": FORMAT_VERSION, "step": int(step), **(meta or {}),
                "names": names}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)))

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        return step

    def _format(self, step: int) -> int:
        return 1 if (self.directory / str(step) / "meta").exists() else 0

    def read_meta(self, step: int | None = None) -> dict:
        """The ``meta`` item of a checkpoint (``{"format_version": 0}`` for a format-0 one)."""
        step = self._step(step)
        if self._format(step) == 0:
            return {"format_version": 0, "step": step}
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Restores into the structure (and shardings) of ``template``, matching arrays by name."""
        step = self._step(step)
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
            raise CheckpointFormatError(
                f"Checkpoint {self.directory}/{step} has format {meta['format_version']}, newer "
                f"than this spdjax reads ({FORMAT_VERSION}); upgrade spdjax.")
        saved = set(meta["names"])
        missing, extra = sorted(set(names) - saved), sorted(saved - set(names))
        if missing or extra:
            raise CheckpointFormatError(
                f"Checkpoint {self.directory}/{step} does not fit this run's state: missing "
                f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                f"{extra[:8]}{' ...' if len(extra) > 8 else ''}.")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(dict(zip(names, abstract))))).state
        return jax.tree.unflatten(treedef, [restored[n] for n in names])

    def restore_arrays(self, step: int | None = None, *, unflatten: bool = True) -> dict:
        """A checkpoint's arrays without a template: nested dicts by name (or flat by name)."""
        step = self._step(step)
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

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
