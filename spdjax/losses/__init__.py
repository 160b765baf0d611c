"""SPD loss terms: pure functions ``loss(params, ctx, key, **options) -> scalar``.

* :mod:`~spdjax.losses.context`: :class:`Context`, what a step computes once.
* :mod:`~spdjax.losses.recon`: stochastic / CI-masked / unmasked reconstruction (+ layerwise,
  subset-routed, hidden activations; optional delta component).
* :mod:`~spdjax.losses.adversarial`: PGD reconstruction (full, subset, layerwise).
* :mod:`~spdjax.losses.persistent_pgd`: persistent PGD (VPD), alone and merged with
  stochastic-subset reconstruction.
* :mod:`~spdjax.losses.regularisers`: faithfulness (VPD's Delta-L2), importance and frequency
  minimality.
* :mod:`~spdjax.losses.minimality`: VPD's smooth-L0 importance minimality (annealed gamma) and
  nested frequency minimality (one batch or an EMA across steps).
* :mod:`~spdjax.losses.locality`: VPD's nonlinearity locality (subcomponents on few neurons/heads).
* :mod:`~spdjax.losses.divergences`: ``mse``, ``kl``.
* :mod:`~spdjax.losses.total`: :func:`term`, :func:`total_loss`, the :data:`LOSSES` registry.
* :mod:`~spdjax.losses.checks`: :func:`options`, the option checks a term declares next to its
  definition (and :func:`term` runs when it binds that term).

Normalisations follow the SPD paper ("Method") and the later reference implementation
(goodfire-ai/spd); see each module and the README's "Loss normalisations".
"""

from spdjax.losses.adversarial import (assign_state, pgd_masks, pgd_recon, pgd_recon_layerwise,
                                      pgd_recon_subset)
from spdjax.losses.persistent_pgd import persistent_pgd_recon, stochastic_pgd_recon_subset
from spdjax.losses.checks import (Check, boolean, nonnegative, nonnegative_finite, nonnegative_int,
                                   one_of, options, positive_finite, positive_int)
from spdjax.losses.context import Context, checked, make_context
from spdjax.losses.divergences import DIVERGENCES, ce, kl, mse
from spdjax.losses.recon import (ci_masked_recon, ci_masked_recon_layerwise,
                                 stochastic_hidden_acts_recon, stochastic_recon,
                                 stochastic_recon_layerwise, stochastic_recon_subset,
                                 unmasked_recon)
from spdjax.losses.locality import nonlinearity_locality
from spdjax.losses.minimality import (annealed_gamma, couples_examples, linear_anneal,
                                      nested_frequency_minimality, nested_frequency_minimality_ema,
                                      smooth_l0_importance_minimality)
from spdjax.losses.regularisers import (annealed_p, delta_l2, faithfulness, frequency_minimality,
                                        importance_minimality)
from spdjax.losses.total import (LOSSES, Term, make_total_loss, term, term_key, terms_from_config,
                                 total_loss)

__all__ = [
    "Check", "Context", "boolean", "nonnegative", "nonnegative_finite", "nonnegative_int",
    "one_of", "positive_finite", "positive_int", "DIVERGENCES", "LOSSES", "Term", "annealed_p",
    "ce", "checked", "ci_masked_recon",
    "ci_masked_recon_layerwise", "faithfulness", "frequency_minimality", "importance_minimality",
    "kl", "make_context", "make_total_loss", "mse", "options", "persistent_pgd_recon", "pgd_masks",
    "pgd_recon", "pgd_recon_layerwise", "pgd_recon_subset", "stochastic_hidden_acts_recon",
    "stochastic_recon", "stochastic_recon_layerwise", "stochastic_recon_subset", "term",
    "assign_state", "stochastic_pgd_recon_subset",
    "term_key", "terms_from_config", "total_loss", "unmasked_recon",
    "annealed_gamma", "couples_examples", "delta_l2", "linear_anneal",
    "nested_frequency_minimality", "nested_frequency_minimality_ema", "nonlinearity_locality",
    "smooth_l0_importance_minimality",
]
