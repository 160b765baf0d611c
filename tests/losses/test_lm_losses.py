"""Language-model recon terms: KL and soft cross-entropy over the vocabulary at every position,
and mask draws evaluated in chunks with bounded memory."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from scipy.special import log_softmax

import spdjax
from spdjax.losses import ce, kl


def test_kl_and_ce_against_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
    lp, lq = log_softmax(target, axis=-1), log_softmax(pred, axis=-1)
    want_kl = np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1))
    want_ce = np.mean(-np.sum(np.exp(lp) * lq, axis=-1))
    np.testing.assert_allclose(jax.jit(kl)(pred, target), want_kl, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(ce)(pred, target), want_ce, rtol=1e-5)
    np.testing.assert_allclose(ce(target, target), np.mean(-np.sum(np.exp(lp) * lp, -1)),
                               rtol=1e-5)  # CE of the target itself is its entropy


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(64, 16, name="embed")(ids)
        h = h + nn.Dense(16, name="mlp_out")(nn.relu(nn.Dense(32, name="mlp_in")(h)))
        return nn.Dense(64, name="unembed")(h)


def _setup(batch=(4, 12)):
    m = TinyLM()
    ids = jax.random.randint(jax.random.key(0), batch, 0, 64)
    # the inits jitted: one compile each, not one per eager op
    target, tp = spdjax.from_linen(m, jax.jit(m.init)(jax.random.key(0), ids), ids)
    d = spdjax.decompose(target, {"mlp_*": 16, "unembed": 16})
    return d, tp, jax.jit(d.init)(jax.random.key(1), tp), ids


def test_sample_chunks_give_the_same_loss_and_gradient():
    # One term: every stochastic term draws its samples through the same function.
    term = spdjax.stochastic_recon_layerwise
    d, tp, params, ids = _setup()

    def loss(p, chunk):
        ctx = spdjax.make_context(d, tp, p, ids)
        return term(p, ctx, jax.random.key(3), n_samples=4, divergence="kl", sample_chunk=chunk)

    full = jax.jit(jax.value_and_grad(lambda p: loss(p, None)))(params)
    chunked = jax.jit(jax.value_and_grad(lambda p: loss(p, 2)))(params)
    np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(chunked[1]), jax.tree.leaves(full[1])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


def test_sample_chunks_bound_peak_memory():
    d, tp, params, ids = _setup((16, 64))

    def temp_bytes(chunk):
        def loss(p):
            ctx = spdjax.make_context(d, tp, p, ids)
            return spdjax.stochastic_recon(p, ctx, jax.random.key(0), n_samples=8,
                                           divergence="kl", sample_chunk=chunk)

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(1) < 0.6 * temp_bytes(None)
    with pytest.raises(ValueError, match="sample_chunk must be in"):
        temp_bytes(9)
