"""Checkpoints of the train state via orbax, behind one small interface.

The state is saved as its flat list of leaves, so site names (which may contain ``/``) never
become file names; restoring needs a template state with the same structure.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores pytrees under ``directory`` keyed by step (keeps the last ``keep``)."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 2):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        leaves = jax.tree.leaves(state)
        self._manager.save(step, args=ocp.args.StandardSave(leaves))

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Restores into the structure (and shardings) of ``template``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        leaves, treedef = jax.tree.flatten(template)
        abstract = [ocp.utils.to_shape_dtype_struct(x) for x in leaves]
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return jax.tree.unflatten(treedef, restored)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
