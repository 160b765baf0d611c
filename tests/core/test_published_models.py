"""Transformers from a published Flax model library (Hugging Face transformers' Flax GPT-2 and
Llama), built small with random weights, decompose at every weight with their logits reproduced.

GPT-2 stores its projections torch-style as ``Conv1D`` kernels of shape ``(out, in)`` and ties
its unembedding to ``wte``; Llama uses rotary positions and grouped key/value heads.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from transformers import FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM, GPT2Config, LlamaConfig

import spdjax
from helpers import assert_reproduces_target

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 7)))


def logits_fn(model):
    def fn(params, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return model.module.apply({"params": params}, ids, jnp.ones_like(ids), positions,
                                  deterministic=True).logits

    return fn


def test_hf_gpt2():
    model = FlaxGPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2,
                                           n_head=2), seed=0)
    target, tp = spdjax.from_jax(logits_fn(model), model.params, IDS)
    sites = {n: (s.kind, s.d_in, s.d_out) for n, s in target.sites.items()}
    assert sites["transformer/h/0/attn/c_attn"] == ("linear", 16, 48)  # kernel stored (48, 16)
    assert sites["transformer/h/1/mlp/c_proj"] == ("linear", 64, 16)
    assert sites["transformer/wte"] == ("embed", 50, 16)
    assert sites["transformer/wte#2"] == ("linear", 16, 50)  # the tied unembedding
    assert len(sites) == 2 + 2 * 4 + 1
    np.testing.assert_allclose(target(tp, IDS), model(IDS).logits, rtol=1e-5, atol=1e-5)
    assert_reproduces_target(spdjax.decompose(target, {"*": 64}), tp, IDS, layerwise=False)


@pytest.mark.slow  # GPT-2 covers the published-library path in the default suite
def test_hf_llama():
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = FlaxLlamaForCausalLM(config, seed=0)
    target, tp = spdjax.from_jax(logits_fn(model), model.params, IDS)
    sites = {n: (s.kind, s.d_in, s.d_out) for n, s in target.sites.items()}
    assert sites["model/layers/0/self_attn/k_proj"] == ("linear", 16, 8)  # 2 kv heads of 4
    assert sites["model/layers/1/mlp/down_proj"] == ("linear", 24, 16)
    assert len(sites) == 1 + 2 * 7 + 1
    np.testing.assert_allclose(target(tp, IDS), model(IDS).logits, rtol=1e-5, atol=1e-5)
    d = spdjax.decompose(target, {"*/layers/*": 24, "lm_head": 50})
    assert_reproduces_target(d, tp, IDS, layerwise=False)
