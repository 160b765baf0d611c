"""What a decomposed transformer is judged by: KL and CE of masked models, CI per token.

For every masking of the decomposed sites (``ci_masked``: masks = CI; ``stochastic``: one draw
of the training masks; ``unmasked``: every site = V U) the summary holds ``kl_<masking>`` (KL of
the target's next-token distribution to the masked model's, summed over the vocabulary, mean
over positions) and ``ce_<masking>`` next to ``ce_target`` (the induction toy: CE of the answer
at the induction position; the byte LM: next-token CE on the validation split), CI-L0 per site
per token, and for the induction toy CI-L0 at the induction position and elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spdjax.decomposition import ci_l0
from spdjax.experiments.lm import data as lm_data
from spdjax.experiments.lm import model as lm_model
from spdjax.losses import kl, make_context
from spdjax.masks import sample_masks

EVAL_KEY = 1234  # the evaluation batch: fixed, so runs compare on the same tokens
EVAL_SEQUENCES = {"induction": 512, "bytes": 64}
L0_THRESHOLD = 0.1


def eval_batch(cfg: lm_model.LMConfig):
    """``(ids, labels)`` (labels None for the byte LM): the fixed evaluation batch."""
    key = jax.random.key(EVAL_KEY)
    n = EVAL_SEQUENCES[cfg.data]
    if cfg.data == "induction":
        return lm_model.induction(cfg, key, n)
    return lm_data.window_batch(lm_model.corpus_tokens(cfg, "val"), key, n, cfg.seq_len), None


def _ce(cfg, logits, ids, labels) -> float:
    if cfg.data == "induction":
        return float(lm_model.last_position_ce(logits, labels))
    return float(lm_model.next_token_ce(logits, ids))


def target_quality(params: dict, cfg: lm_model.LMConfig, key=None) -> dict:
    """The trained target's CE on the evaluation batch, and its accuracy at the induction
    position for the induction toy."""
    del key
    ids, labels = eval_batch(cfg)
    logits = lm_model.Transformer(cfg).apply({"params": params}, ids)
    out = {"target_ce": _ce(cfg, logits, ids, labels)}
    if cfg.data == "induction":
        out["target_induction_accuracy"] = float(jnp.mean(jnp.argmax(logits[:, -1], -1) == labels))
    else:
        out["target_bits_per_byte"] = out["target_ce"] / float(np.log(2))
    return out


def masked_logits(decomp, params, target_params, ids, key) -> dict:
    """``{masking: logits}`` for the CI-masked, stochastically masked and unmasked models."""
    ctx = make_context(decomp, target_params, params, ids)
    lower = {n: c.lower for n, c in ctx.ci.items()}
    return ctx, {
        "ci_masked": decomp.forward(target_params, params, ids, lower),
        "stochastic": decomp.forward(target_params, params, ids, sample_masks(key, lower)),
        "unmasked": decomp.forward(target_params, params, ids, {n: None for n in lower}),
    }


def evaluate(decomp, params, target_params, cfg: lm_model.LMConfig, *, steps=None) -> dict:
    """KL / CE of the masked models, CI-L0 per site (per token), induction-position CI."""
    del steps
    if not hasattr(decomp, "causal_importance"):
        return {"warnings": ["the LM evaluation measures SPD decompositions (CI); none here"]}
    ids, labels = eval_batch(cfg)
    ctx, logits = jax.jit(lambda p, tp, i: masked_logits(decomp, p, tp, i, jax.random.key(0)))(
        params, target_params, ids)
    out = {"ce_target": _ce(cfg, ctx.target_out, ids, labels)}
    for masking, lg in logits.items():
        out[f"kl_{masking}"] = float(kl(lg, ctx.target_out))
        out[f"ce_{masking}"] = _ce(cfg, lg, ids, labels)
    out["ci_l0_per_token"] = {n: float(ci_l0(c.lower, L0_THRESHOLD)) for n, c in ctx.ci.items()}
    if cfg.data == "induction":
        out["target_induction_accuracy"] = float(
            jnp.mean(jnp.argmax(ctx.target_out[:, -1], -1) == labels))
        out["ci_masked_induction_accuracy"] = float(
            jnp.mean(jnp.argmax(logits["ci_masked"][:, -1], -1) == labels))
        out["ci_l0_induction_position"] = {
            n: float(ci_l0(c.lower[:, -1], L0_THRESHOLD)) for n, c in ctx.ci.items()}
        out["ci_l0_other_positions"] = {
            n: float(ci_l0(c.lower[:, :-1], L0_THRESHOLD)) for n, c in ctx.ci.items()}
    out["warnings"] = []
    return out
