"""spdjax: Stochastic Parameter Decomposition in JAX/Flax.

Library use in three lines::

    target, target_params = spdjax.from_linen(model, variables)
    decomp = spdjax.decompose(target, {"layers_*/mlp_in": 100})
    params = decomp.init(key, target_params)

then build ``ctx = spdjax.make_context(decomp, target_params, params, batch)`` inside your loss and
compose the pure loss functions of :mod:`spdjax.losses`.
"""

from spdjax.adapters import from_linen, from_nnx
from spdjax.data import sparse_features
from spdjax.decomposition import CausalImportance, Decomposition, decompose, match_sites
from spdjax.losses import (
    LOSSES,
    Context,
    ci_masked_recon,
    ci_masked_recon_layerwise,
    faithfulness,
    importance_minimality,
    make_context,
    make_total_loss,
    stochastic_recon,
    stochastic_recon_layerwise,
    unmasked_recon,
)
from spdjax.masks import sample_masks
from spdjax.sharding import make_mesh, shard_params
from spdjax.sigmoids import SIGMOID_TYPES, get_sigmoid
from spdjax.step import (
    TrainState,
    init_train_state,
    make_optimizer,
    make_train_step,
    spd_objective,
)
from spdjax.target import Site, SiteHooks, Target, from_function, weight_at

__all__ = [
    "CausalImportance", "Context", "Decomposition", "LOSSES", "SIGMOID_TYPES", "Site", "SiteHooks",
    "Target", "TrainState", "ci_masked_recon", "ci_masked_recon_layerwise", "decompose",
    "faithfulness", "from_function", "from_linen", "from_nnx", "get_sigmoid",
    "importance_minimality", "init_train_state", "make_context", "make_mesh", "make_total_loss",
    "make_optimizer", "make_train_step", "match_sites", "sample_masks", "shard_params", "sparse_features",
    "spd_objective", "stochastic_recon", "stochastic_recon_layerwise", "unmasked_recon",
    "weight_at",
]
