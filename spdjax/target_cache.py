"""On-disk cache of trained targets: ``<stem>.npz`` (params) + ``<stem>.json`` (recipe, metadata).

A cached target is reused only if the recipe stored in its sidecar equals the recipe asked for;
writes are write-then-rename, npz first, so a sidecar on disk always describes a complete npz.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np


def default_cache_dir() -> pathlib.Path:
    """Where trained targets are cached: ``$SPDJAX_CACHE/targets``, else ``~/.cache/spdjax/targets``."""
    return pathlib.Path(os.environ.get("SPDJAX_CACHE", "~/.cache/spdjax")).expanduser() / "targets"


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> ``{"a/b/c": array}``."""
    flat = {}
    for k, v in tree.items():
        flat.update(flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return {k: np.asarray(v) for k, v in flat.items()}


def unflatten(flat: Any) -> dict:
    """Inverse of :func:`flatten` (values become jax arrays)."""
    tree: dict = {}
    for path in flat:
        *parents, leaf = path.split("/")
        functools.reduce(lambda node, p: node.setdefault(p, {}), parents, tree)[leaf] = (
            jnp.asarray(flat[path]))
    return tree


def load(stem: str, recipe: dict, what: str) -> dict | None:
    """The cached params at ``stem`` if its sidecar holds ``recipe``, else None (says why)."""
    if not (os.path.exists(stem + ".npz") and os.path.exists(stem + ".json")):
        return None
    with open(stem + ".json") as f:
        meta = json.load(f)
    if meta.get("recipe") != json.loads(json.dumps(recipe)):  # tuples as lists, as read back
        print(f"{what} cache {stem}.json has another recipe; retraining.")
        return None
    with np.load(stem + ".npz") as flat:
        return unflatten(flat)


def save(stem: str, params: dict, meta: dict) -> None:
    """Writes ``stem.npz`` then ``stem.json`` (``meta`` should hold the ``recipe``)."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".npz.tmp", "wb") as f:
        np.savez(f, **flatten(params))
    os.replace(stem + ".npz.tmp", stem + ".npz")
    with open(stem + ".json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")


def read_meta(stem: str) -> dict:
    with open(stem + ".json") as f:
        return json.load(f)
