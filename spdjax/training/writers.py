"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard event files and Weights & Biases.

Every writer has ``write_scalars(step, scalars)``, ``write_images(step, paths)``, ``flush()`` and
``close()``. :func:`make_writer` builds the run's writer from its config:

* ``metrics.jsonl`` always (:class:`~spdjax.training.workdir.JsonlWriter`: what resuming,
  the health check and the training-curve figure read);
* ``config.tensorboard = True``: event files in ``<workdir>/tensorboard`` through tensorboardX
  (``pip install tensorboardX``; ``tensorboard --logdir <workdir>/tensorboard`` shows them). A
  resumed run purges the events after its checkpoint, as the JSONL file drops those lines;
* ``config.wandb_project = "name"``: the same scalars and the figures to W&B (``pip install
  wandb``; ``WANDB_MODE=offline`` works without a network). A resumed run continues the W&B run
  of the same id (kept in ``<workdir>/wandb_run_id``).

Figures (PNG files written at the end of a run) go to TensorBoard and W&B as images.

A TensorBoard folder that is a file or cannot be written is refused with one line
(:func:`check_dirs`; the CLI checks before any work, :func:`make_writer` before training).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

from spdjax.training import workdir as wd


def _require(module: str, field: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{field} asks for {module}, which is not installed: "
                         f"pip install {install}.") from e


class TensorBoardWriter:
    """Scalars and images as TensorBoard event files in ``logdir`` (tensorboardX)."""

    def __init__(self, logdir: str | pathlib.Path, *, resume_step: int | None = None):
        tbx = _require("tensorboardX", "tensorboard=True", "tensorboardX")
        # purge_step: TensorBoard drops events logged after the checkpoint a run resumes from
        self._writer = tbx.SummaryWriter(str(logdir), purge_step=resume_step or None,
                                         flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), int(step))

    def write_images(self, step: int, paths: Sequence[pathlib.Path]) -> None:
        import matplotlib.image

        for path in paths:
            image = matplotlib.image.imread(path)  # float [H, W, 3 or 4] in [0, 1]
            self._writer.add_image(f"figures/{pathlib.Path(path).stem}", image[..., :3],
                                   int(step), dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter:
    """Scalars and images to a Weights & Biases run (resumed under the id kept in the workdir)."""

    def __init__(self, project: str, workdir: pathlib.Path, config: Mapping[str, Any]):
        wandb = _require("wandb", f"wandb_project={project!r}", "wandb")
        id_file = workdir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        wd.write_atomic(id_file, run_id)
        self._wandb = wandb
        self._run = wandb.init(project=project, name=workdir.name, id=run_id, resume="allow",
                               config=dict(config), dir=str(workdir))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log({k: float(v) for k, v in scalars.items()}, step=int(step))

    def write_images(self, step: int, paths: Sequence[pathlib.Path]) -> None:
        self._run.log({f"figures/{pathlib.Path(p).stem}": self._wandb.Image(str(p))
                       for p in paths}, step=int(step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._run.finish()


class Writers:
    """Several writers as one."""

    def __init__(self, writers: Sequence[Any]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, paths: Sequence[pathlib.Path]) -> None:
        for w in self.writers:
            if hasattr(w, "write_images"):
                w.write_images(step, paths)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def write_evaluation(writer: Any, step: int, scalars: Mapping[str, float]) -> None:
    """The final evaluation's scalars (``eval/...``) to TensorBoard / W&B; not to
    ``metrics.jsonl``, which keeps one line per training log step (``summary.json`` holds the
    evaluation)."""
    for w in getattr(writer, "writers", []):
        if not isinstance(w, (wd.JsonlWriter, wd.MemoryWriter)):
            w.write_scalars(step, scalars)


def check_config(config) -> None:
    """The writer fields of a config (part of :func:`spdjax.training.validation.validate`)."""
    if not isinstance(config.tensorboard, bool):
        raise ValueError(f"tensorboard must be true or false, got {config.tensorboard!r}.")
    if not isinstance(config.wandb_project, str):
        raise ValueError(f"wandb_project must be a W&B project name or '' (off), got "
                         f"{config.wandb_project!r}.")
    if config.tensorboard:
        _require("tensorboardX", "tensorboard=True", "tensorboardX")
    if config.wandb_project:
        _require("wandb", f"wandb_project={config.wandb_project!r}", "wandb")


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Raises a one-line ``ValueError`` unless ``path`` is a writable folder or can be created as
    one (its nearest existing ancestor is a writable folder). ``what`` names it in the message."""
    path = pathlib.Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if existing is None:
        return
    if not existing.is_dir():
        where = "is a file" if existing == path else f"would be created below {existing}, a file"
        raise ValueError(f"The {what} {path} {where}, not a folder; move it away or choose "
                         "another workdir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "is" if existing == path else f"would be created in {existing}, which is"
        raise ValueError(f"The {what} {path} {where} not writable (read-only); make it writable "
                         "or choose another workdir.")


def check_dirs(config, workdir: str | os.PathLike) -> None:
    """The folders ``config``'s writers will write in ``workdir``, checked before any work
    (:func:`check_writable_dir`): ``<workdir>/tensorboard`` when ``config.tensorboard``."""
    if config.tensorboard:
        check_writable_dir(pathlib.Path(workdir) / "tensorboard", "TensorBoard folder")


def make_writer(config, workdir: pathlib.Path, resume_step: int | None) -> Writers:
    """The writer of a run in ``workdir`` resumed at ``resume_step`` (None: a fresh run)."""
    check_dirs(config, workdir)
    writers: list[Any] = [wd.JsonlWriter(workdir / "metrics.jsonl", resume_step=resume_step)]
    if config.tensorboard:
        writers.append(TensorBoardWriter(workdir / "tensorboard", resume_step=resume_step))
    if config.wandb_project:
        writers.append(WandbWriter(config.wandb_project, workdir, config.to_dict()))
    return Writers(writers)
