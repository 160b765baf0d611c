"""Token data for the transformer targets: induction-head sequences and a byte-level corpus.

Both are ``key -> [batch, seq]`` int32 batches that run inside a jitted step.

* :func:`induction_batch`: the later reference implementation's ``InductionDataset``
  (goodfire-ai/spd, its induction-head experiment): BOS = 0, tokens
  ``1..V``, induction token ``S = V + 1``; ``[BOS, T..., S, M, T..., S]`` with ``S M`` at a
  uniform position in ``[1, prefix_window)``; the answer (label) is ``M``.
* The byte corpus: the Python standard library's ``.py`` sources (on every machine with Python,
  nothing fetched), read in sorted path order and joined with a separator, as bytes (vocabulary
  256), held on disk as a memory-mapped ``uint8`` array with a JSON sidecar (files, bytes,
  SHA-256). :func:`build_corpus` writes it once; :func:`load_corpus` memory-maps it;
  :func:`window_batch` samples uniform windows from a split of it on the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import sysconfig

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
BOS = 0
SEPARATOR = b"\n\x00\n"  # between files: the NUL byte never occurs in source text
VAL_FRACTION = 0.05  # the last 5% of the corpus is the validation split


@functools.partial(jax.jit, static_argnums=1,
                   static_argnames=("vocab", "seq_len", "prefix_window"))
def induction_batch(key: Array, batch: int, *, vocab: int, seq_len: int,
                    prefix_window: int) -> tuple[Array, Array]:
    """``(ids [batch, seq_len], labels [batch])`` of induction sequences (module docstring)."""
    k_fill, k_pos, k_m = jax.random.split(key, 3)
    ids = jax.random.randint(k_fill, (batch, seq_len), 1, vocab + 1)
    pos = jax.random.randint(k_pos, (batch,), 1, prefix_window)
    m = jax.random.randint(k_m, (batch,), 1, vocab + 1)
    col = jnp.arange(seq_len)[None, :]
    s = vocab + 1
    ids = jnp.where(col == pos[:, None], s, ids)
    ids = jnp.where(col == pos[:, None] + 1, m[:, None], ids)
    ids = ids.at[:, 0].set(BOS).at[:, -1].set(s)
    return ids.astype(jnp.int32), m.astype(jnp.int32)


# ------------------------------------------------------------------------------ byte corpus


def stdlib_sources() -> list[pathlib.Path]:
    """The standard library's ``.py`` files (no site-packages, no tests), in sorted order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__")
    return sorted(p for p in root.rglob("*.py")
                  if not any(part in skip for part in p.relative_to(root).parts))


def corpus_stem(cache_dir: str | os.PathLike, max_bytes: int) -> pathlib.Path:
    """Where the byte corpus of at most ``max_bytes`` lives (add ``.u8`` / ``.json``), per Python
    version: its standard library is the text."""
    v = sys.version_info
    # No dots in the name: the files are the stem plus ".u8" / ".json".
    return pathlib.Path(cache_dir).expanduser() / f"stdlib_py{v.major}{v.minor}_{max_bytes}b"


def build_corpus(cache_dir: str | os.PathLike, max_bytes: int) -> pathlib.Path:
    """Writes the byte corpus (at most ``max_bytes``) as ``<stem>.u8`` + ``<stem>.json``;
    returns the stem. Written once: an existing complete corpus is kept."""
    stem = corpus_stem(cache_dir, max_bytes)
    if stem.with_suffix(".json").exists():
        return stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = stdlib_sources()
    if not files:
        raise FileNotFoundError(f"No .py files under {sysconfig.get_paths()['stdlib']}: no "
                                "standard-library sources to build the corpus from.")
    chunks, size, used = [], 0, 0
    for path in files:
        data = path.read_bytes().replace(b"\x00", b"") + SEPARATOR
        chunks.append(data[:max_bytes - size])
        size += len(chunks[-1])
        used += 1
        if size >= max_bytes:
            break
    data = b"".join(chunks)
    tmp = stem.with_suffix(".u8.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, stem.with_suffix(".u8"))
    meta = {"source": "python stdlib .py files", "python": sys.version.split()[0],
            "files": used, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "vocab": 256, "val_fraction": VAL_FRACTION}
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, stem.with_suffix(".json"))
    return stem


def load_corpus(cache_dir: str | os.PathLike, max_bytes: int) -> tuple[np.memmap, dict]:
    """The corpus as a read-only memory map (built first if absent) and its metadata."""
    stem = build_corpus(cache_dir, max_bytes)
    meta = json.loads(stem.with_suffix(".json").read_text())
    data = np.memmap(stem.with_suffix(".u8"), dtype=np.uint8, mode="r")
    if data.shape[0] != meta["bytes"]:
        raise ValueError(f"Corpus {stem}.u8 holds {data.shape[0]} bytes, its sidecar says "
                         f"{meta['bytes']}: delete both files to rebuild it.")
    return data, meta


def split_sizes(n_bytes: int) -> tuple[int, int]:
    """``(train, val)`` sizes of a corpus of ``n_bytes`` (:func:`split`)."""
    cut = int(n_bytes * (1 - VAL_FRACTION))
    return cut, n_bytes - cut


def min_corpus_bytes(seq_len: int) -> int:
    """The smallest corpus whose both splits hold a window of ``seq_len`` bytes."""
    n = seq_len  # both sizes grow by 0 or 1 per byte: the first that fits is the threshold
    while min(split_sizes(n)) < seq_len:
        n += 1
    return n


def check_corpus_bytes(corpus_bytes, seq_len: int) -> None:
    """Raises a one-line ``ValueError`` unless a corpus of ``corpus_bytes`` has room for windows
    of ``seq_len`` in both splits (checked before a corpus is built or a target trained)."""
    low = min_corpus_bytes(seq_len)
    if isinstance(corpus_bytes, bool) or not isinstance(corpus_bytes, (int, np.integer)) or (
            corpus_bytes < low):
        raise ValueError(f"corpus_bytes must be an integer >= {low} (both corpus splits need "
                         f"windows of seq_len={seq_len} bytes; the last {VAL_FRACTION:.0%} is "
                         f"the validation split), got {corpus_bytes!r}.")


def split(data: np.ndarray, which: str) -> np.ndarray:
    """``"train"`` (the first 95%) or ``"val"`` (the rest) of the corpus."""
    cut = int(len(data) * (1 - VAL_FRACTION))
    if which not in ("train", "val"):
        raise ValueError(f"Unknown corpus split {which!r}; expected 'train' or 'val'.")
    return data[:cut] if which == "train" else data[cut:]


def window_batch(tokens: Array, key: Array, batch: int, seq_len: int) -> Array:
    """``[batch, seq_len]`` int32 windows of ``tokens`` (a device array) at uniform offsets."""
    if tokens.shape[0] < seq_len:
        raise ValueError(f"The corpus split has {tokens.shape[0]} tokens, too few for windows of "
                         f"{seq_len}.")
    return _windows(tokens, key, batch, seq_len)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _windows(tokens: Array, key: Array, batch: int, seq_len: int) -> Array:
    """One compiled program per shape (op by op, each batch compiled several small ones)."""
    starts = jax.random.randint(key, (batch,), 0, tokens.shape[0] - seq_len + 1)
    idx = starts[:, None] + jnp.arange(seq_len)[None, :]
    return tokens[idx].astype(jnp.int32)
