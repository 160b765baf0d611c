"""Target families (TMS, ResidMLP) and the experiments built from a run config.

* :mod:`~spdjax.experiments.registry`: :class:`Family`, :class:`Experiment`, the registry;
* :mod:`~spdjax.experiments.target_training`: one trainer and cache for every toy target;
* :mod:`~spdjax.experiments.tms`, :mod:`~spdjax.experiments.resid_mlp`: the families.
"""
