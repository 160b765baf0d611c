"""spdjax: Stochastic Parameter Decomposition in JAX/Flax.

Library use in three lines::

    target, target_params = spdjax.from_linen(model, variables, example_batch)
    decomp = spdjax.decompose(target, {"layers_*/mlp_in": 100})
    params = decomp.init(key, target_params)

then build ``ctx = spdjax.make_context(decomp, target_params, params, batch)`` inside your loss and
compose the pure loss functions of :mod:`spdjax.losses` (or bind them with :func:`term`). Runs
from configs: :func:`setup` / :func:`train` / :func:`evaluate` (names resolved by
:mod:`spdjax.config.runs`; values taken by :mod:`spdjax.training.loop`); a model of your own
gets the managed run through a :class:`Family`; finished runs: :func:`load`.

The layers, bottom to top (an upward import fails CI): :mod:`spdjax.core` -> :mod:`spdjax.losses`
-> :mod:`spdjax.methods` -> :mod:`spdjax.analysis` -> :mod:`spdjax.training` ->
:mod:`spdjax.families` -> :mod:`spdjax.config` -> :mod:`spdjax.cli` -> :mod:`spdjax.view` (the
browser viewer).
"""

from spdjax import config
from spdjax import config as configs  # also spdjax.configs: scripts call spdjax.configs.load
from spdjax.core.adapters import from_linen, from_nnx
from spdjax.core.pretrained import from_pretrained
from spdjax.core.tracing import from_jax
from spdjax.config.runs import LoadedRun, load, setup, setup_ensemble, train_and_evaluate
from spdjax.core.ci import CI_FUNCTIONS, MLP, SharedMLP, VectorMLP
from spdjax.core.ci_global import ChunkwiseTransformer, GlobalMLP, GlobalTransformer
from spdjax.core.components import COMPONENT_INITS, init_gaussian, init_paper, init_svd
from spdjax.core.data import sparse_features
from spdjax.core.decomposition import CausalImportance, Decomposition, ci_l0, decompose, match_sites
from spdjax.losses import (
    LOSSES,
    Context,
    Term,
    ci_masked_recon,
    ci_masked_recon_layerwise,
    faithfulness,
    frequency_minimality,
    delta_l2,
    importance_minimality,
    make_context,
    nested_frequency_minimality,
    nested_frequency_minimality_ema,
    nonlinearity_locality,
    persistent_pgd_recon,
    smooth_l0_importance_minimality,
    stochastic_pgd_recon_subset,
    make_total_loss,
    pgd_recon,
    pgd_recon_layerwise,
    pgd_recon_subset,
    stochastic_hidden_acts_recon,
    stochastic_recon,
    stochastic_recon_layerwise,
    stochastic_recon_subset,
    term,
    total_loss,
    unmasked_recon,
)
from spdjax.core.masks import SAMPLERS, SiteMask, sample_masks
from spdjax.core.routing import ROUTERS, static_probability
from spdjax.methods import METHODS, DecompositionView, Method, MethodSpec
from spdjax.methods.spd import make_optimizer
from spdjax.methods.spd import method as spd_method
from spdjax.methods.spd import objective as spd_objective
from spdjax.core.sigmoids import SIGMOIDS, SigmoidPair
from spdjax.core.target import (Mapped, Site, SiteHooks, Target, dense_input, from_function,
                                weight_at)
from spdjax.training.family import FAMILIES, Experiment, Family
from spdjax.training.loop import Run, close, evaluate, plot, train
from spdjax.training.sharding import make_mesh, shard_params
from spdjax.training.step import TrainState, init_train_state, make_train_step

__all__ = [
    "DecompositionView", "Experiment", "FAMILIES", "Family", "MethodSpec", "config", "plot",
    "setup_ensemble",
    "CI_FUNCTIONS", "COMPONENT_INITS", "CausalImportance", "Context", "Decomposition", "LOSSES",
    "LoadedRun", "METHODS", "MLP", "Method", "Run", "SAMPLERS", "SIGMOIDS", "SharedMLP",
    "Mapped", "SigmoidPair", "Site", "SiteHooks", "Target", "Term", "dense_input", "TrainState",
    "VectorMLP", "ci_l0", "ChunkwiseTransformer", "GlobalMLP", "GlobalTransformer",
    "ci_masked_recon", "ci_masked_recon_layerwise", "close", "configs", "decompose", "evaluate",
    "ROUTERS", "SiteMask", "frequency_minimality", "pgd_recon", "pgd_recon_layerwise",
    "pgd_recon_subset", "static_probability", "stochastic_hidden_acts_recon",
    "stochastic_recon_subset",
    "faithfulness", "from_function", "from_jax", "from_linen", "from_nnx", "from_pretrained",
    "importance_minimality",
    "init_gaussian", "init_paper", "init_svd", "init_train_state", "load", "make_context",
    "make_mesh",
    "make_optimizer", "make_total_loss", "make_train_step", "match_sites", "sample_masks",
    "setup", "shard_params", "sparse_features", "spd_method", "spd_objective",
    "stochastic_recon", "stochastic_recon_layerwise", "term", "total_loss", "train",
    "train_and_evaluate", "unmasked_recon", "weight_at", "delta_l2",
    "nested_frequency_minimality", "nested_frequency_minimality_ema", "nonlinearity_locality",
    "persistent_pgd_recon", "smooth_l0_importance_minimality", "stochastic_pgd_recon_subset",
]
