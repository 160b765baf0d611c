"""Analyses of a trained decomposition, apart from training and from plotting.

* :mod:`~spdjax.analysis.metrics`: MMCS/ML2R, subcomponent norms, neuron contributions, CI on
  one-hot inputs, alive subcomponents;
* :mod:`~spdjax.analysis.ci_patterns`: permutations and the paper's CI-pattern error counts;
* :mod:`~spdjax.analysis.plots`: figures every decomposition has (CI heatmaps, training curves);
* :mod:`~spdjax.analysis.suite`: the evaluation suite (loss per masking, PGD ladder, L0, alive)
  and its figures, :mod:`~spdjax.analysis.suite_plots`;
* reading a decomposition over a dataset: :mod:`~spdjax.analysis.harvest` (firing, co-occurrence,
  token statistics, examples; its result in :mod:`~spdjax.analysis.harvest_result`) and
  :mod:`~spdjax.analysis.dataset_attributions` (gradient x
  activation summed over data, the direct forward of :mod:`~spdjax.analysis.grad_act`), both
  over the resumable stream of :mod:`~spdjax.analysis.streaming`;
  :mod:`~spdjax.analysis.clustering` of subcomponents into
  mechanisms (the MDL merge of :mod:`~spdjax.analysis.mdl_merge`, figures in
  :mod:`~spdjax.analysis.clustering_plots`);
* one prompt at a time: :mod:`~spdjax.analysis.graphs` (attribution graphs: edges in
  :mod:`~spdjax.analysis.graph_compute`, pruning in :mod:`~spdjax.analysis.graph_prune`,
  validation in :mod:`~spdjax.analysis.graph_validate`, the figure in
  :mod:`~spdjax.analysis.graph_plots`) and :mod:`~spdjax.analysis.interventions` (keep / ablate,
  sparse CI for a token);
* :mod:`~spdjax.config.runs`: :func:`load` a run's workdir for analysis.
"""
