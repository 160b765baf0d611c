"""Training the toy targets: one chunked trainer and one on-disk cache for every toy family.

A family describes its target training as a :class:`TargetTrainer` (init, loss, batches,
optimizer); :func:`train` runs it as jitted ``lax.scan`` chunks of ``chunk_steps`` steps, step
``i`` drawing its batch from ``fold_in(data_key, i)`` with ``(init, data, eval)`` keys split from
the seed. Trained targets are cached as ``<stem>.npz`` (params) + ``<stem>.json`` (recipe,
metadata): a cached target is reused only if the recipe in its sidecar equals the one asked for;
writes are write-then-rename, npz first, so a sidecar on disk always describes a complete npz.
Inside :func:`load_or_train`, :func:`train` also keeps its progress next to the cache file
(``<stem>.partial_seed<seed>.npz`` / ``.json``: params, optimizer state, step; written after a
chunk at most every :data:`PARTIAL_EVERY_S` seconds) and a later call resumes from it: an
interrupted target training loses at most that much work, and the resumed target is the
uninterrupted one (step ``i``'s batch depends only on ``i``). A cache directory that cannot hold
files (below a regular file, read-only) is refused with one line before any training
(:func:`check_cache_dir`); training reports one progress line per chunk.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax.training.progress import Progress

log = logging.getLogger("spdjax")


def default_cache_dir() -> pathlib.Path:
    """Where trained targets are cached: ``$SPDJAX_CACHE/targets``, else
    ``~/.cache/spdjax/targets``."""
    return pathlib.Path(os.environ.get("SPDJAX_CACHE", "~/.cache/spdjax")).expanduser() / "targets"


def _blocking_file(path: pathlib.Path) -> pathlib.Path | None:
    """The nearest of ``path`` and its ancestors that exists and is not a directory, if any."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def check_cache_dir(directory: str | os.PathLike, *, create: bool = False) -> pathlib.Path:
    """Raises a one-line ``ValueError`` if ``directory`` cannot be a target cache: it, or a folder
    it would be created in, is a regular file; with ``create`` (before training a target into it)
    it is also created and must be writable. Returns it as a path."""
    path = pathlib.Path(directory).expanduser()
    hint = ("choose a folder that can hold the cached targets (config.target_cache_dir, "
            "--cache-dir or SPDJAX_CACHE)")
    blocking = _blocking_file(path)
    if blocking is not None:
        what = "is a file" if blocking == path else f"is below {blocking}, which is a file"
        raise ValueError(f"The target cache directory {directory} {what}, not a directory; "
                         f"{hint}.")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"The target cache directory {directory} cannot be created "
                             f"({e.strerror or e}); {hint}.") from e
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"The target cache directory {directory} is not writable; "
                             f"{hint}.")
    return path


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


def save_params(path: str | os.PathLike, params: dict) -> None:
    """Writes a nested dict of arrays to ``path`` (``.npz``, keys ``a/b/c``), atomically."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **flatten(params))
    os.replace(path + ".tmp", path)


def load_params(path: str | os.PathLike) -> dict:
    """Reads what :func:`save_params` wrote."""
    with np.load(os.fspath(path)) as flat:
        return unflatten(flat)


def load(stem: str, recipe: dict, what: str) -> dict | None:
    """The cached params at ``stem`` if its sidecar holds ``recipe``, else None (says why).

    A damaged cache file (truncated, garbled) is reported and treated as absent: the target is
    retrained and the files rewritten.
    """
    if not (os.path.exists(stem + ".npz") and os.path.exists(stem + ".json")):
        return None
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
        if meta.get("recipe") != json.loads(json.dumps(recipe)):  # tuples as lists, as read back
            log.warning("%s cache %s.json has another recipe; retraining.", what, stem)
            return None
        return load_params(stem + ".npz")
    except Exception as e:  # noqa: BLE001 - any unreadable cache file is damage
        log.warning("%s cache %s is damaged (%s: %s); retraining.", what, stem,
                    type(e).__name__, e)
        return None


def save(stem: str, params: dict, meta: dict) -> None:
    """Writes ``stem.npz`` then ``stem.json`` (``meta`` should hold the ``recipe``)."""
    save_params(stem + ".npz", params)
    with open(stem + ".json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(stem + ".json.tmp", stem + ".json")


def read_meta(stem: str) -> dict:
    """The ``.json`` sidecar of the target cached at ``stem`` (recipe, seed, training info)."""
    with open(stem + ".json") as f:
        return json.load(f)


def load_or_train(stem: str, recipe: dict, what: str,
                  train_fn: Callable[[], tuple[dict, dict]]) -> dict:
    """The params cached at ``stem`` for ``recipe``, else ``train_fn() -> (params, meta)``, cached.

    ``meta`` is written to the sidecar next to the ``recipe``. Every :func:`train` that
    ``train_fn`` calls keeps partial progress next to ``stem`` and resumes from it (module
    docstring).
    """
    check_cache_dir(os.path.dirname(stem) or ".")
    cached = load(stem, recipe, what)
    if cached is not None:
        return cached
    check_cache_dir(os.path.dirname(stem) or ".", create=True)  # before, not after, training
    log.info("Training the %s target (cached afterwards in %s.npz).", what, stem)
    token = _PARTIAL.set((stem, json.loads(json.dumps(recipe))))
    try:
        params, meta = train_fn()
    finally:
        _PARTIAL.reset(token)
    save(stem, params, {"recipe": recipe, **meta})
    folder, name = pathlib.Path(stem).parent, pathlib.Path(stem).name
    for ext in ("npz", "json"):  # every seed's (a checked target tries several); not a .tmp
        for stale in folder.glob(f"{name}.partial_seed*.{ext}"):  # another process may write
            stale.unlink(missing_ok=True)
    return params


# ------------------------------------------------------------------- partial progress, resumed

PARTIAL_EVERY_S = 60.0  # least seconds between two writes of a training's partial progress
# (stem, recipe) of the load_or_train call a train() runs inside; None: keep no progress
_PARTIAL: contextvars.ContextVar[tuple[str, Any] | None] = contextvars.ContextVar(
    "spdjax_target_partial", default=None)


def _partial_stem(seed: int) -> str | None:
    where = _PARTIAL.get()
    return None if where is None else f"{where[0]}.partial_seed{seed}"


def _save_partial(path: str, state, progress: dict) -> None:
    """``path.npz`` (the leaves of ``state``: trainable params, optimizer state) then
    ``path.json`` (the recipe, ``progress``), each written then renamed: a sidecar always
    describes a complete npz."""
    arrays = {str(i): np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(state))}
    with open(path + ".npz.tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".npz.tmp", path + ".npz")
    with open(path + ".json.tmp", "w") as f:
        json.dump({"recipe": _PARTIAL.get()[1], **progress}, f)
    os.replace(path + ".json.tmp", path + ".json")


def _load_partial(path: str, like, expect: dict, what: str):
    """``(state, progress)``: the state shaped as ``like`` and the progress saved at ``path`` for
    this recipe and ``expect`` (steps, chunk size), else None; a damaged or other recipe's file
    is reported and ignored."""
    if not (os.path.exists(path + ".npz") and os.path.exists(path + ".json")):
        return None
    try:
        with open(path + ".json") as f:
            progress = json.load(f)
        if progress.pop("recipe") != _PARTIAL.get()[1] or any(
                progress.get(k) != v for k, v in expect.items()):
            log.warning("%s partial target %s.json is another training's; starting over.",
                        what, path)
            return None
        leaves, treedef = jax.tree.flatten(like)
        with np.load(path + ".npz") as z:
            if len(z.files) != len(leaves):
                raise ValueError(f"{len(z.files)} arrays, expected {len(leaves)}")
            restored = []
            for i, leaf in enumerate(leaves):
                if z[str(i)].shape != np.shape(leaf):
                    raise ValueError(f"array {i} has shape {z[str(i)].shape}, expected "
                                     f"{np.shape(leaf)}")
                restored.append(jnp.asarray(z[str(i)], dtype=jnp.asarray(leaf).dtype))
        return jax.tree.unflatten(treedef, restored), progress
    except Exception as e:  # noqa: BLE001 - any unreadable partial file is damage
        log.warning("%s partial target %s is damaged (%s: %s); starting over.", what, path,
                    type(e).__name__, e)
        return None


# ----------------------------------------------------------------------------- the trainer


@dataclasses.dataclass(frozen=True)
class TargetTrainer:
    """How to train one toy target.

    Attributes:
      init: ``key -> (trainable, frozen)`` param dicts.
      loss: ``(trainable, frozen, batch) -> scalar``.
      sample: ``key -> batch``.
      optimizer: trains ``trainable``.
      apply: ``(trainable, updates) -> trainable`` (default ``optax.apply_updates``).
      finish: ``(trainable, frozen) -> params`` of the trained target (default: merged dicts).
      evaluate: ``(trainable, frozen) -> {name: scalar}`` (e.g. a validation loss), run and
        logged after every chunk of steps and kept in ``info["evals"]``; None: nothing.
    """

    init: Callable[[jax.Array], tuple[dict, dict]]
    loss: Callable[[dict, dict, Any], jax.Array]
    sample: Callable[[jax.Array], Any]
    optimizer: optax.GradientTransformation
    apply: Callable[[dict, dict], dict] = optax.apply_updates
    finish: Callable[[dict, dict], dict] | None = None
    evaluate: Callable[[dict, dict], dict] | None = None


@functools.lru_cache(maxsize=None)
def _chunk(make_trainer: Callable[[Hashable], TargetTrainer], recipe: Hashable, n_steps: int):
    """Jitted ``(trainable, frozen, opt_state, root_key, start) -> (trainable, opt_state,
    losses[n_steps])``, cached per recipe so that retries with other seeds do not recompile."""
    trainer = make_trainer(recipe)
    opt = trainer.optimizer

    def step(carry, i):
        trainable, frozen, opt_state, root = carry
        batch = trainer.sample(jax.random.fold_in(root, i))
        loss, grads = jax.value_and_grad(trainer.loss)(trainable, frozen, batch)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return (trainer.apply(trainable, updates), frozen, opt_state, root), loss

    @jax.jit
    def chunk(trainable, frozen, opt_state, root, start):
        xs = start + jnp.arange(n_steps, dtype=jnp.int32)
        carry, losses = jax.lax.scan(step, (trainable, frozen, opt_state, root), xs)
        return carry[0], carry[2], losses

    return trainer, chunk


def train(make_trainer: Callable[[Hashable], TargetTrainer], recipe: Hashable, steps: int,
          seed: int, *, what: str, chunk_steps: int = 1000) -> tuple[dict, dict]:
    """Trains the target of ``make_trainer(recipe)`` for ``steps`` from ``seed``.

    Returns ``(params, info)``: ``info`` holds ``seed``, ``losses`` (one mean per chunk),
    ``final_loss`` (the last of them), ``seconds``, ``eval_key`` (the seed's third key, for a
    family's own report on fresh batches) and ``evals`` (``{"step": i, **trainer.evaluate(...)}``
    after each chunk; empty without ``trainer.evaluate``).
    """
    t0 = time.perf_counter()
    k_init, k_data, k_eval = jax.random.split(jax.random.key(seed), 3)
    chunk_steps = min(chunk_steps, steps)
    trainer, chunk = _chunk(make_trainer, recipe, chunk_steps)
    trainable, frozen = trainer.init(k_init)
    opt_state = trainer.optimizer.init(trainable)
    losses, evals, done, before = [], [], 0, 0.0
    partial, expect = _partial_stem(seed), {"steps": steps, "chunk_steps": chunk_steps}
    resumed = partial and _load_partial(partial, (trainable, opt_state), expect, what)
    if resumed:
        (trainable, opt_state), saved = resumed
        losses, evals, done, before = (saved["losses"], saved["evals"], saved["done"],
                                       saved["seconds"])
        log.info("Resuming the %s target (seed %d) at step %d of %d from %s.npz.", what, seed,
                 done, steps, partial)
    progress = Progress(steps, done, label=f"{what} target (seed {seed})")
    last_save = time.perf_counter()
    while done < steps:
        if steps - done < chunk_steps:  # the remainder compiles once more
            _, chunk = _chunk(make_trainer, recipe, steps - done)
        trainable, opt_state, ls = chunk(trainable, frozen, opt_state, k_data, jnp.int32(done))
        done += ls.shape[0]
        losses.append(float(jnp.mean(ls)))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"{what} seed {seed}: loss {losses[-1]} at step {done}.")
        progress.report_chunk(done, losses[-1])  # one line per chunk
        if trainer.evaluate is not None:
            evals.append({"step": done, **{k: float(v) for k, v in
                                           trainer.evaluate(trainable, frozen).items()}})
            log.info("%s target (seed %d): step %d | %s", what, seed, done, " | ".join(
                f"{k} {v:.4f}" for k, v in evals[-1].items() if k != "step"))
        if partial and done < steps and time.perf_counter() - last_save >= PARTIAL_EVERY_S:
            _save_partial(partial, (trainable, opt_state), dict(
                expect, done=done, losses=losses, evals=evals,
                seconds=before + time.perf_counter() - t0))
            last_save = time.perf_counter()
    finish = trainer.finish or (lambda t, f: {**t, **f})
    info = {"seed": seed, "losses": losses, "final_loss": losses[-1],
            "seconds": before + time.perf_counter() - t0, "eval_key": k_eval, "evals": evals}
    return finish(trainable, frozen), info
