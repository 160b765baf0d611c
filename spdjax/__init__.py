"""spdjax: Stochastic Parameter Decomposition in JAX/Flax.

Library use in three lines::

    target, target_params = spdjax.from_linen(model, variables, example_batch)
    decomp = spdjax.decompose(target, {"layers_*/mlp_in": 100})
    params = decomp.init(key, target_params)

then build ``ctx = spdjax.make_context(decomp, target_params, params, batch)`` inside your loss and
compose the pure loss functions of :mod:`spdjax.losses` (or bind them with :func:`term`). Runs
from configs: :func:`setup` / :func:`train` / :func:`evaluate` (:mod:`spdjax.training.loop`);
finished runs: :func:`load`.
"""

from spdjax import configs
from spdjax.adapters import from_linen, from_nnx
from spdjax.tracing import from_jax
from spdjax.analysis.load import LoadedRun, load
from spdjax.ci import CI_FUNCTIONS, MLP, SharedMLP, VectorMLP
from spdjax.components import COMPONENT_INITS, init_gaussian, init_paper
from spdjax.data import sparse_features
from spdjax.decomposition import CausalImportance, Decomposition, ci_l0, decompose, match_sites
from spdjax.losses import (
    LOSSES,
    Context,
    Term,
    ci_masked_recon,
    ci_masked_recon_layerwise,
    faithfulness,
    frequency_minimality,
    importance_minimality,
    make_context,
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
from spdjax.masks import SAMPLERS, SiteMask, sample_masks
from spdjax.routing import ROUTERS, static_probability
from spdjax.methods import METHODS, Method
from spdjax.methods.spd import make_optimizer
from spdjax.methods.spd import method as spd_method
from spdjax.methods.spd import objective as spd_objective
from spdjax.sigmoids import SIGMOIDS, SigmoidPair
from spdjax.target import Mapped, Site, SiteHooks, Target, dense_input, from_function, weight_at
from spdjax.training.loop import Run, close, evaluate, setup, train, train_and_evaluate
from spdjax.training.sharding import make_mesh, shard_params
from spdjax.training.step import TrainState, init_train_state, make_train_step

__all__ = [
    "CI_FUNCTIONS", "COMPONENT_INITS", "CausalImportance", "Context", "Decomposition", "LOSSES",
    "LoadedRun", "METHODS", "MLP", "Method", "Run", "SAMPLERS", "SIGMOIDS", "SharedMLP",
    "Mapped", "SigmoidPair", "Site", "SiteHooks", "Target", "Term", "dense_input", "TrainState", "VectorMLP", "ci_l0",
    "ci_masked_recon", "ci_masked_recon_layerwise", "close", "configs", "decompose", "evaluate",
    "ROUTERS", "SiteMask", "frequency_minimality", "pgd_recon", "pgd_recon_layerwise",
    "pgd_recon_subset", "static_probability", "stochastic_hidden_acts_recon",
    "stochastic_recon_subset",
    "faithfulness", "from_function", "from_jax", "from_linen", "from_nnx", "importance_minimality",
    "init_gaussian", "init_paper", "init_train_state", "load", "make_context", "make_mesh",
    "make_optimizer", "make_total_loss", "make_train_step", "match_sites", "sample_masks",
    "setup", "shard_params", "sparse_features", "spd_method", "spd_objective",
    "stochastic_recon", "stochastic_recon_layerwise", "term", "total_loss", "train",
    "train_and_evaluate", "unmasked_recon", "weight_at",
]
