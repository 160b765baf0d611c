"""Published models from disk (:func:`spdjax.from_pretrained`): Hugging Face's Flax GPT-2, Llama,
BERT, T5 and ViT, built tiny with random weights and written by ``save_pretrained`` into a temp
directory (nothing downloaded), load as targets whose output is the model's own, and decompose
at every weight with that output reproduced when ``V U = W``.

What each model adds to the tracing: GPT-2 stores its projections torch-style as ``Conv1D``
kernels of shape ``(out, in)`` and ties its unembedding to ``wte``; Llama has rotary positions and
grouped key/value heads; BERT takes token types and an attention mask; T5 is an encoder-decoder
with a shared, tied embedding and relative-position buckets (the ``jnp.clip`` shim); ViT embeds
patches with a convolution.
"""

import importlib.util
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as hf

import spdjax
from spdjax.core import pretrained

RNG = np.random.RandomState(0)
IDS = jnp.asarray(RNG.randint(0, 50, (2, 7)))
DECODER_IDS = jnp.asarray(RNG.randint(0, 50, (2, 5)))
PIXELS = jnp.asarray(RNG.normal(size=(2, 3, 8, 8)), jnp.float32)  # channels first, as HF's
BERT_INPUTS = {"input_ids": IDS, "attention_mask": jnp.asarray([[1] * 7, [1] * 4 + [0] * 3]),
               "token_type_ids": jnp.asarray([[0] * 4 + [1] * 3] * 2)}

# name -> (Flax class, its tiny config, the target's input, HF's call arguments for it)
MODELS = {
    "gpt2": (hf.FlaxGPT2LMHeadModel,
             lambda: hf.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2),
             IDS, {"input_ids": IDS}),
    "llama": (hf.FlaxLlamaForCausalLM,
              lambda: hf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=16),
              IDS, {"input_ids": IDS}),
    "bert": (hf.FlaxBertForMaskedLM,
             lambda: hf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32,
                                   max_position_embeddings=16),
             BERT_INPUTS, BERT_INPUTS),
    "t5": (hf.FlaxT5ForConditionalGeneration,
           lambda: hf.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                               num_heads=2, relative_attention_num_buckets=8),
           (IDS, DECODER_IDS), {"input_ids": IDS, "decoder_input_ids": DECODER_IDS}),
    "vit": (hf.FlaxViTForImageClassification,
            lambda: hf.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 num_labels=3),
            PIXELS, {"pixel_values": PIXELS}),
}

# a few sites per model: (kind, d_in, d_out); and how many sites in all
SITES = {
    "gpt2": ({"transformer/h/0/attn/c_attn": ("linear", 16, 48),  # kernel stored (48, 16)
              "transformer/h/0/mlp/c_proj": ("linear", 64, 16),
              "transformer/wte": ("embed", 50, 16),
              "transformer/wte#2": ("linear", 16, 50)},  # the tied unembedding
             2 + 4 + 1),
    "llama": ({"model/layers/0/self_attn/k_proj": ("linear", 16, 8),  # 2 kv heads of 4
               "model/layers/0/mlp/down_proj": ("linear", 24, 16),
               "lm_head": ("linear", 16, 50)},
              1 + 7 + 1),
    "bert": ({"bert/embeddings/token_type_embeddings": ("embed", 2, 16),
              "bert/encoder/layer/0/intermediate/dense": ("linear", 16, 32),
              "cls/predictions/transform/dense": ("linear", 16, 16),
              "bert/embeddings/word_embeddings#2": ("linear", 16, 50)},  # tied decoder
             3 + 6 + 2),
    "t5": ({"shared": ("embed", 50, 16),  # encoder lookup; #2 the decoder's, #3 the unembedding
            "shared#2": ("embed", 50, 16),
            "shared#3": ("linear", 16, 50),
            "encoder/block/0/layer/0/SelfAttention/relative_attention_bias": ("embed", 8, 2),
            "decoder/block/0/layer/1/EncDecAttention/o": ("linear", 8, 16)},
           3 + (5 + 2) + (5 + 4 + 2)),
    "vit": ({"vit/embeddings/patch_embeddings/projection": ("conv", 4 * 4 * 3, 16),
             "vit/encoder/layer/0/attention/attention/query": ("linear", 16, 16),
             "classifier": ("linear", 16, 3)},
            1 + 6 + 1),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, HF model, its params): random weights (normal, std 0.3) in the shapes
    the model declares, written by save_pretrained. Built on first use."""
    made = {}

    def get(name):
        if name not in made:
            cls, config, _, _ = MODELS[name]
            with pretrained._t5_clip_compat():  # T5's constructor traces it for its shapes
                model = cls(config(), _do_init=False)
            rng = np.random.default_rng(0)
            params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype),
                                  model.params_shape_tree)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path, params=params)
            made[name] = path, model, params
        return made[name]

    return get


def hf_output(model, params, kwargs, field="logits"):
    """The model's own output, called the way Hugging Face documents (jitted: faster here)."""
    @jax.jit
    def call(params, kwargs):
        with pretrained._t5_clip_compat():
            return model(**kwargs, params=params)[field]

    return call(params, kwargs)


def exact_params(d, tp):
    """Factors with ``V U = W`` exactly (``V = [W, 0]``, ``U = [I; 0]``) and zero CI params: the
    check sets every mask to 1, so the CI functions' values do not matter and their random init
    (a compile per site shape) is skipped."""
    shapes = jax.eval_shape(d.init, jax.random.key(0), tp)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    for name in d.owners:
        W = np.asarray(d.site(name).weight(tp))
        pad = d.C[name] - W.shape[1]
        params["components"][name] = {"V": np.pad(W, ((0, 0), (0, pad))),
                                      "U": np.pad(np.eye(W.shape[1], dtype=W.dtype),
                                                  ((0, pad), (0, 0)))}
    return params


def assert_target_and_decomposition(target, tp, x, want):
    """``target(tp, x)`` equals ``want``, and so does the decomposition of every site with
    ``V U = W`` and all masks 1 (nothing left for the unmasked and faithfulness losses)."""
    d = spdjax.decompose(target, {"*": 64})  # C above every site's rank

    @jax.jit
    def compute(params, x):
        ctx = spdjax.make_context(d, tp, params, x)
        ones = {n: jnp.ones_like(c.lower) for n, c in ctx.ci.items()}
        return (ctx.target_out, d.forward(tp, params, x, ones),
                spdjax.unmasked_recon(params, ctx), spdjax.faithfulness(params, ctx))

    out, masked, unmasked, faith = compute(exact_params(d, tp), x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(masked, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(unmasked, 0.0, atol=1e-10)
    np.testing.assert_allclose(faith, 0.0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_decomposes_from_disk(checkpoints, name):
    path, model, params = checkpoints(name)
    _, _, x, hf_kwargs = MODELS[name]
    # BERT traced on its own batch (a dict with masks); the others on the config's default
    target, tp = spdjax.from_pretrained(path, x if name == "bert" else None)
    sites = {n: (s.kind, s.d_in, s.d_out) for n, s in target.sites.items()}
    expected, count = SITES[name]
    assert {n: sites.get(n) for n in expected} == expected
    assert len(sites) == count and not target.unsupported
    assert_target_and_decomposition(target, tp, x, hf_output(model, params, hf_kwargs))


@pytest.mark.parametrize("name, base, field_of", [
    ("bert", "BertModel", "bert"), ("vit", "ViTModel", "vit")])
def test_base_model_of_a_head_checkpoint(checkpoints, name, base, field_of):
    """``architecture=`` picks the base model: its hidden states, no head or pooler sites."""
    path, model, params = checkpoints(name)
    _, _, x, hf_kwargs = MODELS[name]
    target, tp = spdjax.from_pretrained(path, architecture=base)
    head, _ = spdjax.from_pretrained(path)
    body = {n.removeprefix(field_of + "/") for n in head.sites if n.startswith(field_of + "/")}
    assert set(target.sites) == body - {"embeddings/word_embeddings#2"}  # BERT's tied decoder
    base_model = getattr(hf, "Flax" + base)(model.config, _do_init=False, add_pooling_layer=False)
    want = hf_output(base_model, params[field_of], hf_kwargs, "last_hidden_state")
    np.testing.assert_allclose(jax.jit(target)(tp, x), want, rtol=1e-5, atol=1e-5)


def test_default_example_input_from_the_config(checkpoints):
    for name, shape in [("gpt2", (1, 8)), ("vit", (1, 3, 8, 8))]:
        target, _ = spdjax.from_pretrained(checkpoints(name)[0])
        assert target.example.shape == shape
    target, _ = spdjax.from_pretrained(checkpoints("t5")[0])
    assert [a.shape for a in target.example] == [(1, 8), (1, 8)]


def test_safetensors_checkpoint(checkpoints, tmp_path):
    _, model, params = checkpoints("gpt2")
    model.save_pretrained(tmp_path, params=params, safe_serialization=True)
    assert not (tmp_path / "flax_model.msgpack").exists()
    target, tp = spdjax.from_pretrained(tmp_path)
    assert len(target.sites) == SITES["gpt2"][1]
    jax.tree.map(np.testing.assert_array_equal, tp, params)


def test_params_follow_the_batch_to_its_device(checkpoints):
    """The loaded params are not pinned to the device transformers put them on (the host CPU):
    a jitted call with the batch on another device runs there."""
    target, tp = spdjax.from_pretrained(checkpoints("gpt2")[0])
    device = jax.devices()[-1]
    out = jax.jit(target)(tp, jax.device_put(IDS, device))
    assert out.devices() == {device}


def test_inputs_in_the_wrong_form_name_what_is_expected(checkpoints):
    path = checkpoints("t5")[0]
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration needs \['input_ids', "
                                         r"'decoder_input_ids'\].*missing \['decoder_input_ids'"):
        spdjax.from_pretrained(path, IDS)
    with pytest.raises(ValueError, match=r"takes inputs \[.*\]; got \['labels'\]"):
        spdjax.from_pretrained(path, {"input_ids": IDS, "decoder_input_ids": IDS, "labels": IDS})


def test_t5_clip_shim_is_the_old_clip_and_scoped():
    """Inside the shim, T5's ``jnp`` is ``jax.numpy`` with a ``clip`` that also takes the old
    ``a_min``/``a_max`` names; outside, it is ``jax.numpy`` again."""
    from transformers.models.t5 import modeling_flax_t5 as t5

    x = np.linspace(-3.0, 3.0, 13, dtype=np.float32)
    with pretrained._t5_clip_compat():
        shimmed = t5.jnp
        np.testing.assert_array_equal(shimmed.clip(x, a_max=1.0), np.clip(x, None, 1.0))
        np.testing.assert_array_equal(shimmed.clip(x, a_min=-1.0), np.clip(x, -1.0, None))
        np.testing.assert_array_equal(shimmed.clip(x, -2.0, max=0.5), np.clip(x, -2.0, 0.5))
        assert shimmed.log is jnp.log and shimmed.where is jnp.where
        with pretrained._t5_clip_compat():  # nested (a model traced while another is built)
            assert t5.jnp is shimmed
        assert t5.jnp is shimmed
    assert t5.jnp is jnp


def test_a_base_checkpoint_as_a_head_model_names_the_missing_weights(checkpoints, tmp_path):
    _, model, params = checkpoints("bert")
    base = hf.FlaxBertModel(model.config, _do_init=False, add_pooling_layer=False)
    base.save_pretrained(tmp_path, params=params["bert"])
    with pytest.raises(ValueError, match=r"lacks weights that BertForMaskedLM needs: "
                                         r"\['cls/predictions/bias'.*architecture="):
        spdjax.from_pretrained(tmp_path, architecture="BertForMaskedLM")
    target, _ = spdjax.from_pretrained(tmp_path)  # its config says BertModel
    assert "encoder/layer/0/output/dense" in target.sites


def _config_dir(tmp_path, config, *files):
    (tmp_path / "config.json").write_text(json.dumps(config))
    for f in files:
        (tmp_path / f).write_bytes(b"")
    return tmp_path


def test_errors_name_the_path_and_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'.*nowhere' is not a directory"):
        spdjax.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        spdjax.from_pretrained(tmp_path)
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(FileNotFoundError, match=(
            r"PyTorch weights only \(pytorch_model.bin\).*FlaxGPT2LMHeadModel.from_pretrained"
            r"\(path, from_pt=True\).*install torch and pass from_pt=True")):
        spdjax.from_pretrained(_config_dir(tmp_path, gpt2, "pytorch_model.bin"))


def test_no_weights_and_unsupported_architectures(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no model weights: expected one of "
                                                r"\['flax_model.msgpack'"):
        spdjax.from_pretrained(_config_dir(tmp_path, {"model_type": "gpt2"}))
    config = {"model_type": "bert", "architectures": ["BertForSequenceClassification"]}
    with pytest.raises(ValueError, match=r"names \['BertForSequenceClassification'\]; "
                                         r"from_pretrained supports \['BertForMaskedLM', .*"
                                         r"spdjax.from_jax"):
        spdjax.from_pretrained(_config_dir(tmp_path, config, "flax_model.msgpack"))
    with pytest.raises(ValueError, match=r"architecture= names \['OPTForCausalLM'\]"):
        spdjax.from_pretrained(tmp_path, architecture="FlaxOPTForCausalLM")
    with pytest.raises(ValueError, match=r"model_type 'opt'"):
        spdjax.from_pretrained(_config_dir(tmp_path, {"model_type": "opt"}))


def test_without_transformers(tmp_path, monkeypatch):
    """spdjax imports without transformers; from_pretrained then says how to install it."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # None: importing it fails
    spec = importlib.util.spec_from_file_location("fresh_pretrained", pretrained.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    path = _config_dir(tmp_path, {"model_type": "gpt2"}, "flax_model.msgpack")
    with pytest.raises(ImportError, match=r'pip install "spdjax\[hf\]"'):
        spdjax.from_pretrained(path)


def test_readme_routes_example_runs(checkpoints):
    """The README's example of the four routes, run as written on a saved GPT-2 (the from_jax
    route there is how a Hugging Face model in code is decomposed)."""
    readme = pathlib.Path(__file__).resolve().parents[2] / "README.md"
    m = re.search(r"<!-- example:routes.*?\n```python\n(.*?)```", readme.read_text(), re.S)
    assert m, "README block after <!-- example:routes not found"
    code = m.group(1).replace('"checkpoints/gpt2"', repr(str(checkpoints("gpt2")[0])))
    assert code.count(str(checkpoints("gpt2")[0])) == 2
    ns: dict = {}
    exec(compile(code, str(readme), "exec"), ns)
    assert sorted(ns["decomp"].site_names) == ["transformer/h/0/mlp/c_fc",
                                               "transformer/h/0/mlp/c_proj"]
