"""What a decomposed transformer is judged by: KL and CE of masked models, CI per token.

For every masking of the evaluation suite (:func:`spdjax.analysis.suite.suite_masks`:
``unmasked`` / ``unmasked_delta`` (all masks 1 without / with the delta component),
``stochastic`` / ``stochastic_delta`` (one draw of the training masks without / with it),
``ci_masked``, ``rounded_0`` / ``rounded_0.1`` / ``rounded_0.5``, ``random``, ``zero``) the
summary holds ``kl_<masking>`` (KL of the target's next-token distribution to the masked
model's, summed over the vocabulary, mean over positions) and ``ce_<masking>`` next to
``ce_target`` (the induction toy: CE of the answer at the induction position; the byte LM:
next-token CE on the validation split), ``ce_recovered`` ``{masking: (CE_zero - CE_x) /
(CE_zero - CE_target)}``, CI-L0 per site per token, and for the induction toy CI-L0 at the
induction position and elsewhere, and the ``induction`` block: the induction-head
ground-truth criteria (:mod:`spdjax.families.lm.induction`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.analysis import suite
from spdjax.core.decomposition import ci_l0
from spdjax.families.lm import data as lm_data
from spdjax.families.lm import induction
from spdjax.families.lm import model as lm_model
from spdjax.losses import kl, make_context

Array = jax.Array

EVAL_KEY = 1234  # the evaluation batch: fixed, so runs compare on the same tokens
EVAL_SEQUENCES = {"induction": 512, "bytes": 64, "text": 64}
L0_THRESHOLD = 0.1


def eval_batch(cfg: lm_model.LMConfig):
    """``(ids, labels)`` (labels None for the byte LM): the fixed evaluation batch."""
    key = jax.random.key(EVAL_KEY)
    n = EVAL_SEQUENCES[cfg.data]
    if cfg.data == "induction":
        return jax.jit(lambda k: lm_model.induction(cfg, k, n))(key)
    tokens = lm_model.corpus_tokens(cfg, "val")
    return jax.jit(lambda t, k: lm_data.window_batch(t, k, n, cfg.seq_len))(tokens, key), None


def _ce(cfg, logits, ids, labels) -> Array:
    if cfg.data == "induction":
        return lm_model.last_position_ce(logits, labels)
    return lm_model.next_token_ce(logits, ids)


def _accuracy(logits, labels) -> Array:
    return jnp.mean(jnp.argmax(logits[:, -1], -1) == labels)


def target_quality(params: dict, cfg: lm_model.LMConfig, key=None) -> dict:
    """The trained target's CE on the evaluation batch, and its accuracy at the induction
    position for the induction toy."""
    del key
    ids, labels = eval_batch(cfg)

    @jax.jit
    def quality(params, ids, labels):
        logits = lm_model.module(cfg).apply({"params": params}, ids)
        out = {"target_ce": _ce(cfg, logits, ids, labels)}
        if cfg.data == "induction":
            out["target_induction_accuracy"] = _accuracy(logits, labels)
        return out

    out = {k: float(v) for k, v in quality(params, ids, labels).items()}
    if cfg.data == "bytes":
        out["target_bits_per_byte"] = out["target_ce"] / float(np.log(2))
    return out


def masked_logits(decomp, params, target_params, ids, key) -> tuple[Any, dict]:
    """The context and ``{masking: logits}`` for every masking of the evaluation suite
    (:func:`spdjax.analysis.suite.suite_masks`: unmasked with and without the delta
    component, stochastic with and without it, CI as mask, CI rounded at 0 / 0.1 / 0.5,
    random, zero)."""
    ctx = make_context(decomp, target_params, params, ids)
    lower = {n: c.lower for n, c in ctx.ci.items()}
    masks = suite.suite_masks(lower, key, delta=True)
    return ctx, {m: decomp.forward(target_params, params, ids, mk) for m, mk in masks.items()}


def evaluate(decomp, params, target_params, cfg: lm_model.LMConfig, *, steps=None) -> dict:
    """KL / CE of the masked models, CE recovered, CI-L0 per site (per token),
    induction-position CI."""
    del steps
    if decomp.causal_importance is None:
        return {"warnings": ["the LM evaluation measures SPD decompositions (CI); none here"]}
    ids, labels = eval_batch(cfg)

    @jax.jit
    def metrics(params, target_params, ids, labels):
        ctx, logits = masked_logits(decomp, params, target_params, ids, jax.random.key(0))
        out = {"ce_target": _ce(cfg, ctx.target_out, ids, labels)}
        for masking, lg in logits.items():
            out[f"kl_{masking}"] = kl(lg, ctx.target_out)
            out[f"ce_{masking}"] = _ce(cfg, lg, ids, labels)
        out["ci_l0_per_token"] = {n: ci_l0(c.lower, L0_THRESHOLD) for n, c in ctx.ci.items()}
        if cfg.data == "induction":
            out["target_induction_accuracy"] = _accuracy(ctx.target_out, labels)
            out["ci_masked_induction_accuracy"] = _accuracy(logits["ci_masked"], labels)
            out["ci_l0_induction_position"] = {
                n: ci_l0(c.lower[:, -1], L0_THRESHOLD) for n, c in ctx.ci.items()}
            out["ci_l0_other_positions"] = {
                n: ci_l0(c.lower[:, :-1], L0_THRESHOLD) for n, c in ctx.ci.items()}
        return out

    out = jax.tree.map(float, metrics(params, target_params, ids, labels))
    ce = {k[3:]: v for k, v in out.items() if k.startswith("ce_") and k != "ce_target"}
    # (CE_zero - CE_x) / (CE_zero - CE_target): suite.fraction_recovered
    out["ce_recovered"] = suite.recovered_table(ce, out["ce_target"])
    out["warnings"] = []
    if induction.applies(cfg, decomp):  # docs/guides/language_models.md: the ground truth
        out["induction"] = induction.criteria(decomp, params, target_params, cfg, ids, labels)
    return out
