"""Transformer targets as an SPD experiment family: the induction-head toy, a byte-level LM and
Llama-style LMs on English text.

* :mod:`~spdjax.families.lm.model`: the transformer (standard linen layers, decomposed by
  tracing), variants ``ih``, ``bytes``, ``llama_2x128``, ``llama_4x192`` and their training
  recipes;
* :mod:`~spdjax.families.lm.llama`: the Llama-style model (RMSNorm, RoPE, GELU MLP, grouped-query
  attention) and its recipe;
* :mod:`~spdjax.families.lm.text`: text corpora (any text files; by default the Python
  documentation), a locally trained BPE tokenizer, token ids memory-mapped on disk;
* :mod:`~spdjax.families.lm.cache`: the target cache and the report of a cached target;
* :mod:`~spdjax.families.lm.data`: induction sequences and the standard-library byte corpus
  (memory-mapped on disk, built once);
* :mod:`~spdjax.families.lm.evaluation`: KL / CE of masked models, CI-L0 per token;
* :mod:`~spdjax.families.lm.plots`: CI per site and position, top contexts per subcomponent.
"""

from spdjax.training.family import Family, register
from spdjax.families.lm import cache, evaluation, llama, model, plots, text

FAMILY = register(Family(
    name="lm",
    title="transformer LM",
    variants=model.VARIANTS,
    default_variant="ih",
    target=model.target,
    load_target_params=cache.load_or_train_target,
    sites=model.sites,
    sample=model.sample,
    evaluate=evaluation.evaluate,
    plot=plots.plot_run,
    ties={},
    cache_stem=cache.cache_stem,
    report=cache.report,
))

__all__ = ["FAMILY", "cache", "evaluation", "llama", "model", "plots", "text"]
