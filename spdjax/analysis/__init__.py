"""Analyses of a trained decomposition, apart from training and from plotting.

* :mod:`~spdjax.analysis.metrics`: MMCS/ML2R, subcomponent norms, neuron contributions, CI on
  one-hot inputs, alive subcomponents;
* :mod:`~spdjax.analysis.ci_patterns`: permutations and the paper's CI-pattern error counts;
* :mod:`~spdjax.analysis.plots`: figures every decomposition has (CI heatmaps, training curves);
* :mod:`~spdjax.analysis.suite`: the evaluation suite (loss per masking, PGD ladder, L0, alive)
  and its figures, :mod:`~spdjax.analysis.suite_plots`;
* :mod:`~spdjax.config.runs`: :func:`load` a run's workdir for analysis.
"""
