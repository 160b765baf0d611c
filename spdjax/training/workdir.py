"""A run's directory and what the loop writes: lock, config check and history, metric lines.

    workdir/config.json         the resolved config (a resume must match it)
    workdir/metrics.jsonl       one JSON line per log step (writer: the clu vocabulary,
                                ``write_scalars(step, dict)``, ``flush``, ``close``)
    workdir/target_params.npz   the trained target the run decomposes (``spdjax.load`` reads it)
    workdir/checkpoints/        self-describing checkpoints (:mod:`spdjax.training.checkpoints`)
    workdir/summary.json        the final evaluation;  workdir/figures/*.png

Progress and notes go to the ``"spdjax"`` logger (:mod:`spdjax.training.progress`).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import socket
import time
from typing import Any, Callable, Mapping

from spdjax.losses.total import is_default_option
from spdjax.training.checkpoints import Checkpointer

log = logging.getLogger("spdjax")
RUN_FILES = ("metrics.jsonl", "summary.json", "config.json", "init_selection.json",
             "target_params.npz", "history.jsonl", "metrics_after_last_checkpoint.jsonl")
RUN_DIRS = ("checkpoints", "figures", "damaged")


class ConfigMismatchError(ValueError):
    """The workdir holds a run with a different config."""


class UnusableWorkdirError(ValueError):
    """The workdir cannot be used as it is (a path of the wrong kind, every checkpoint damaged,
    a target that is not the one the checkpoints were trained on)."""


class WorkdirLockedError(RuntimeError):
    """Another live process is running in the workdir."""


class WorkdirLock:
    """An exclusive lock on a workdir (``workdir/.lock``), held while a process runs in it.

    Uses ``fcntl.flock``: the kernel drops the lock when its process dies, however it dies, so a
    lock left by a killed run never blocks the resume; a second live process is refused at once.
    """

    def __init__(self, workdir: pathlib.Path):
        import fcntl

        self.path = workdir / ".lock"
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise WorkdirLockedError(
                f"{workdir} is in use by another spdjax process ({holder}); wait for it to end or "
                "use another --workdir.") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the file releases the flock


# Fields that change what a run reports or keeps, not what it trains: a resume may change them
# freely (e.g. to re-evaluate a finished run with a smaller evaluation batch).
SAFE_CHANGES = ("log_every", "checkpoint_every", "eval_batch_size", "eval_microbatches",
                "steps_per_call", "divergence_factor", "figures", "tensorboard", "wandb_project",
                "eval_suite", "eval_pgd_ladder", "eval_pgd_step_size",
                # memory only: the same values, computed in chunks or recomputed
                "output_chunk", "remat_ci")


def config_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``[(dotted key, old, new), ...]`` for every field that differs (``<absent>`` if missing)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


def _spelled_default(change: tuple[str, Any, Any]) -> bool:
    """A loss option one side leaves out and the other sets to the term's default (a config
    file that now names it, e.g. ``sampling="continuous"``): no change to the run."""
    key, a, b = change
    parts = key.split(".")
    if len(parts) != 3 or parts[0] not in ("losses", "eval_losses") or "<absent>" not in (a, b):
        return False
    return is_default_option(parts[1], parts[2], b if a == "<absent>" else a)


def _allowed(key: str, allow: tuple[str, ...]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename, so a reader never sees
    half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def recorded_config(workdir: pathlib.Path) -> dict | None:
    """The config of the run in ``workdir``: ``config.json``, else the newest checkpoint's
    metadata (a missing, empty or garbled ``config.json`` is repaired from it), else None."""
    try:
        return json.loads((workdir / "config.json").read_text())
    except (OSError, ValueError):
        pass
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        for step in reversed(ckpt.all_steps()):
            try:
                config = ckpt.read_meta(step).get("config")
            except Exception:  # noqa: BLE001 - a damaged checkpoint: try the one before
                continue
            if config is not None:
                log.warning("%s/config.json is missing or unreadable; using the config recorded "
                            "in checkpoint %d.", workdir, step)
                return config
    finally:
        ckpt.close()
    return None


def config_dict(config) -> dict:
    """A JSON-ready plain dict of a config (tuples as lists), as written to ``config.json``."""
    return json.loads(json.dumps(config.to_dict(), default=lambda o: list(o)
                                 if isinstance(o, tuple) else str(o)))


def _upgraded(recorded: dict, upgrade: Callable[[dict], dict] | None) -> dict:
    if upgrade is None:
        return recorded
    try:
        return upgrade(recorded)
    except Exception:  # noqa: BLE001 - an unknown experiment or variant: compare as written
        return recorded


# Fields that define what the train state is (its structure and shapes) or which target and
# members it trains (a resume decomposes the target saved in the workdir): a resume may never
# change them, even when --allow_config_change names them (the checkpoints cannot be restored
# into the new state, or were trained on another target); the shapes are compared as well
# (:meth:`spdjax.training.checkpoints.Checkpointer.restore`), for any field not listed here.
STRUCTURAL = ("experiment", "variant", "method", "C", "ci_fn", "ci_hidden", "ensemble",
              "ensemble_sweep", "tie_mode", "tie_sites", "ci_options", "target_seed",
              "target_steps", "target_recipe")
FRESH_HINT = ("use another --workdir, or pass --fresh to start over (the old run's files are "
              "moved aside to <workdir>/old_<time>/, not deleted)")


def structural_change_error(workdir: pathlib.Path, what: str) -> ConfigMismatchError:
    """The one-line refusal of a resume whose state cannot hold the checkpoints'."""
    return ConfigMismatchError(
        f"{workdir} holds a run whose checkpoints do not fit this config ({what}): it cannot be "
        f"resumed with that change; {FRESH_HINT}.")


def check_paths(workdir: pathlib.Path) -> None:
    """A workdir that is a regular file, or a run file that is a directory (or the reverse), is
    one :class:`UnusableWorkdirError` before any work."""
    for parent in (workdir, *workdir.parents):
        if parent.exists() and not parent.is_dir():
            raise UnusableWorkdirError(
                f"--workdir {workdir}: {parent} is a file, not a directory; pass a directory.")
    if not workdir.exists():
        return
    for name in RUN_FILES + ("ensemble.json", ".lock"):
        if (workdir / name).is_dir():
            raise UnusableWorkdirError(
                f"{workdir / name} is a directory where the run writes a file; move it away.")
    for name in RUN_DIRS:
        if (workdir / name).exists() and not (workdir / name).is_dir():
            raise UnusableWorkdirError(
                f"{workdir / name} is a file where the run keeps a directory; move it away.")


def _is_member_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and not path.name.startswith("old_") and any(
        (path / n).exists() for n in ("metrics.jsonl", "summary.json", "figures"))


def move_aside(workdir: pathlib.Path) -> pathlib.Path | None:
    """``--fresh``: the old run's files (and an ensemble's member directories) move to
    ``workdir/old_<time>/``; nothing is deleted. Returns that directory (None: nothing to move)."""
    names = [n for n in RUN_FILES + RUN_DIRS + ("ensemble.json", "tensorboard")
             if (workdir / n).exists()]
    names += sorted(p.name for p in workdir.iterdir() if p.name not in names and _is_member_dir(p))
    if not names:
        return None
    aside = workdir / f"old_{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        n += 1
        aside = workdir / f"old_{time.strftime('%Y%m%d-%H%M%S')}_{n}"
    aside.mkdir()
    for name in names:
        shutil.move(str(workdir / name), aside / name)
    log.warning("--fresh: moved the old run's files (%s) to %s.", ", ".join(names), aside)
    return aside


def check_resume(workdir: pathlib.Path, resolved: dict, *, allow_changes: tuple[str, ...] = (),
                 upgrade: Callable[[dict], dict] | None = None) -> list[tuple[str, Any, Any]]:
    """The config changes of a resume of the run in ``workdir`` with ``resolved`` (``[]`` when
    there is no checkpoint): refused (:class:`ConfigMismatchError`) unless every changed field is
    in :data:`SAFE_CHANGES` or ``allow_changes``; a change of a :data:`STRUCTURAL` field is
    refused always. Writes nothing."""
    if not any((workdir / "checkpoints").glob("[0-9]*")):
        return []
    old = recorded_config(workdir)
    if old is None:
        raise ConfigMismatchError(
            f"{workdir} holds checkpoints but no readable config (config.json and the "
            "checkpoints' metadata are missing or damaged); use another --workdir, or pass "
            "--fresh to start over (the old files are moved aside).")
    changes = [c for c in config_diff(_upgraded(old, upgrade), resolved)
               if not _spelled_default(c)]
    structural = [c for c in changes if _allowed(c[0], STRUCTURAL)]
    if structural:
        raise structural_change_error(
            workdir, "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in structural))
    refused = [c for c in changes if not _allowed(c[0], SAFE_CHANGES + tuple(allow_changes))]
    if refused:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        raise ConfigMismatchError(
            f"{workdir} holds a run with a different config ({listed}). Use another "
            "--workdir, pass --fresh to start over (the old files are moved aside), or resume "
            "it with the change on purpose: "
            f"--allow_config_change={','.join(sorted({k for k, _, _ in refused}))}.")
    return changes


def record_start(workdir: pathlib.Path, resolved: dict, changes: list, step: int = 0) -> None:
    """Logs a start or resume (at ``step``) and its config ``changes`` to ``history.jsonl`` and
    writes ``config.json``: called once the checkpoints are known to fit the config."""
    if changes:
        log.warning("Resuming with config changes: %s.",
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))
    with open(workdir / "history.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(),
                            "step": int(step), "config_changes": [list(c) for c in changes]},
                           default=str) + "\n")
    write_atomic(workdir / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")


def prepare(workdir: pathlib.Path, resolved: dict, *, fresh: bool,
            allow_changes: tuple[str, ...] = (),
            upgrade: Callable[[dict], dict] | None = None) -> list[tuple[str, Any, Any]]:
    """Checks ``resolved`` against the run already in ``workdir`` and writes ``config.json``
    (:func:`check_resume`, then :func:`record_start`); ``fresh`` moves the old run aside first
    (:func:`move_aside`).

    ``upgrade(recorded) -> dict`` gives a record the fields added to configs since it was
    written (:func:`spdjax.config.files.upgrade_record`), so that only real differences count;
    without it the record is compared as written. The managed run
    (:func:`spdjax.training.loop.setup`) calls the two halves itself, writing ``config.json``
    only once the checkpoints are known to fit the new state.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    if fresh:
        move_aside(workdir)
    changes = check_resume(workdir, resolved, allow_changes=allow_changes, upgrade=upgrade)
    record_start(workdir, resolved, changes)
    return changes


def flatten_metrics(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"loss": {"total": x}}`` -> ``{"loss/total": float(x)}``."""
    flat: dict[str, float] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten_metrics(v, f"{prefix}{k}/"))
        else:
            flat[prefix + k] = float(v)
    return flat


def read_metric_lines(metrics_path: pathlib.Path) -> list[dict]:
    """The parseable lines of a ``metrics.jsonl``; a truncated or garbled line (a write cut
    short by a kill) is dropped with a warning."""
    if not metrics_path.exists():
        return []
    rows = []
    for i, line in enumerate(metrics_path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["step"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is damaged (%r...); dropped.", metrics_path, i + 1, line[:60])
            continue
        rows.append(row)
    return rows


def set_aside_lines_after(metrics_path: pathlib.Path, step: int) -> None:
    """Moves the metric lines past ``step`` (the last checkpoint of a run that stopped early) to
    ``metrics_after_last_checkpoint.jsonl``: kept for diagnosis, out of the run's record."""
    rows = read_metric_lines(metrics_path)
    after = [r for r in rows if r["step"] > step]
    if after:
        with open(metrics_path.with_name("metrics_after_last_checkpoint.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in after)
    write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))


class JsonlWriter:
    """Appends ``{"step": s, **scalars}`` lines to ``path``; lines past ``resume_step`` (all of
    them for a fresh start) move to ``metrics_after_last_checkpoint.jsonl``."""

    def __init__(self, path: str | pathlib.Path, *, resume_step: int | None = None):
        self.path = pathlib.Path(path)
        if self.path.exists():  # lines past the checkpoint resumed are set aside, not deleted
            set_aside_lines_after(self.path, -1 if resume_step is None else resume_step)
        self._file = self.path.open("a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MemoryWriter:
    """The writer of a run without a workdir: keeps the metric lines in ``rows``."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.rows.append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

    def flush(self) -> None:
        pass

    def write_images(self, step: int, paths) -> None:
        pass

    def close(self) -> None:
        pass
