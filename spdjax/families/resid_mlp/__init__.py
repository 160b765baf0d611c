"""The residual-MLP toy models ("compressed computation", 1-3 layers) as an SPD experiment family.

* :mod:`~spdjax.families.resid_mlp.model`: the model, variants, the reference's target recipe,
  the naive monosemantic baseline and the target cache;
* :mod:`~spdjax.families.resid_mlp.evaluation`: CI-pattern errors, neuron contributions;
* :mod:`~spdjax.families.resid_mlp.plots`: the paper's figures;
* :mod:`~spdjax.families.resid_mlp.scrubbing`: APD's scrubbed / anti-scrubbed ablations.

Sites: ``layers_<i>/mlp_in`` and ``layers_<i>/mlp_out`` of every layer, all with ``config.C``;
``W_E`` / ``W_U = W_Eᵀ`` are frozen and not decomposed. The SPD data is the target's input
distribution (features ``U[-1, 1)`` active with probability 0.01), fresh every step.
"""

from spdjax.training.family import Family, register
from spdjax.families.resid_mlp import evaluation, model, plots


FAMILY = register(Family.from_modules("resid_mlp", "ResidMLP", "1", model, evaluation, plots))

__all__ = ["FAMILY", "evaluation", "model", "plots"]
