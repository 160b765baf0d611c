"""Training runs: the jitted step, the loop, checkpoints, schedules, sharding, workdirs.

* :mod:`~spdjax.training.step`: :class:`TrainState`, ``make_train_step`` (method-agnostic);
* :mod:`~spdjax.training.loop`: ``setup(config) -> Run``, ``train``, ``evaluate``, ``plot``;
* :mod:`~spdjax.training.checkpoints`: self-describing orbax checkpoints;
* :mod:`~spdjax.training.schedules`, :mod:`~spdjax.training.sharding`,
  :mod:`~spdjax.training.init_selection`, :mod:`~spdjax.training.workdir`.
"""
