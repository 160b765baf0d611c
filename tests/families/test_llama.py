"""The Llama-style targets: the model against a NumPy forward (RMSNorm, RoPE, grouped-query
attention), the text corpus and its BPE tokenizer, the target cache's corpus key, clear errors,
and a tiny run end to end through the CLI's function."""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest

from spdjax.config import files as configs
from spdjax.config.runs import train_and_evaluate
from spdjax.families.lm import cache as lm_cache
from spdjax.families.lm import llama
from spdjax.families.lm import model as lm_model
from spdjax.families.lm import text as lm_text

TINY = dict(d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=24, seq_len=8,
            vocab_size=300)


def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def _np_rope(x, base):
    """``x [T, heads, dh]`` rotated as complex numbers ``x[:dh/2] + i x[dh/2:]``."""
    T, _, dh = x.shape
    z = x[..., : dh // 2] + 1j * x[..., dh // 2:]
    theta = np.arange(T)[:, None] * base ** (-np.arange(dh // 2) * 2.0 / dh)  # [T, dh/2]
    z = z * np.exp(1j * theta)[:, None, :]
    return np.concatenate([z.real, z.imag], -1)


def _np_llama(p, ids, cfg):
    """One sequence ``ids [T]`` through the model, written out in NumPy (float64)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    T, H, G, dh = len(ids), cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    x = p["embed"]["embedding"][ids]
    for i in range(cfg.n_layers):
        b = p[f"blocks_{i}"]
        h = _np_rms(x, b["attn_norm"]["scale"], cfg.norm_eps)
        q = _np_rope((h @ b["attn"]["q"]["kernel"]).reshape(T, H, dh), cfg.rope_base)
        k = _np_rope((h @ b["attn"]["k"]["kernel"]).reshape(T, G, dh), cfg.rope_base)
        v = (h @ b["attn"]["v"]["kernel"]).reshape(T, G, dh)
        heads = []
        for j in range(H):
            g = j // (H // G)  # the key/value head of query head j
            s = q[:, j] @ k[:, g].T / math.sqrt(dh)
            s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            heads.append((w / w.sum(-1, keepdims=True)) @ v[:, g])
        x = x + np.concatenate(heads, -1) @ b["attn"]["out"]["kernel"]
        z = _np_rms(x, b["mlp_norm"]["scale"], cfg.norm_eps) @ b["mlp_in"]["kernel"]
        gelu = 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
        x = x + gelu @ b["mlp_out"]["kernel"]
    return _np_rms(x, p["final_norm"]["scale"], cfg.norm_eps) @ p["unembed"]["kernel"]


def test_llama_matches_a_numpy_forward_and_its_sites_follow_the_family():
    cfg = llama.LlamaConfig(**TINY)

    @jax.jit  # one compile, not one per eager op
    def init():
        params = lm_model.init_params(jax.random.key(0), cfg)
        # non-trivial norm scales and larger weights, so RMSNorm, RoPE and the grouping matter
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        return jax.tree.unflatten(tree, [
            1.0 + 0.3 * jax.random.normal(k, a.shape) if a.ndim == 1 else 10.0 * a
            for k, a in zip(keys, leaves)])

    params = init()
    ids = np.array([[5, 17, 299, 0, 42, 42, 7, 256], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    target = lm_model.target(cfg)
    # the linen model and the traced target, compiled together
    got, traced = (np.asarray(a) for a in jax.jit(lambda p, i: (
        lm_model.module(cfg).apply({"params": p}, i), target(p, i)))(params, ids))
    want = np.stack([_np_llama(params, row, cfg) for row in ids])
    assert got.shape == (2, 8, 300)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)

    attn = {f"blocks_{i}/attn/{p}" for i in range(2) for p in ("q", "k", "v", "out")}
    mlp = {f"blocks_{i}/{m}" for i in range(2) for m in ("mlp_in", "mlp_out")}
    assert set(target.sites) == attn | mlp | {"embed", "unembed"}
    assert (target.sites["blocks_0/attn/k"].d_in, target.sites["blocks_0/attn/k"].d_out) == (16, 8)
    assert target.sites["blocks_1/mlp_in"].d_out == 24
    np.testing.assert_allclose(traced, got, rtol=1e-5, atol=1e-5)


def test_llama_config_errors_are_clear():
    with pytest.raises(ValueError, match="d_model 16 is not a multiple of n_heads 3"):
        llama.LlamaConfig(**{**TINY, "n_heads": 3, "n_kv_heads": 1})
    with pytest.raises(ValueError, match="n_heads 4 is not a multiple of n_kv_heads 3"):
        llama.LlamaConfig(**{**TINY, "n_kv_heads": 3})
    with pytest.raises(ValueError, match="head width .* = 3 must be even"):
        llama.LlamaConfig(**{**TINY, "d_model": 12})
    with pytest.raises(ValueError, match=r"vocab_size must be in \[257, 65536\]"):
        llama.LlamaConfig(**{**TINY, "vocab_size": 100})
    with pytest.raises(ValueError, match="text_files must be glob patterns"):
        llama.LlamaConfig(**TINY, text_files=("a.txt", 3))
    # one string of comma-separated patterns (what --config.target_recipe.text_files gives)
    assert llama.LlamaConfig(**TINY, text_files="a/*.txt, b.md").text_files == ("a/*.txt", "b.md")
    assert llama.LlamaConfig(**TINY, text_files="") == llama.LlamaConfig(**TINY)


def _write_texts(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in texts.items():
        (folder / name).write_text(t, encoding="utf-8")
    return str(folder / "*.txt")


TEXTS = {"a.txt": "The quick brown fox jumps over the lazy dog. " * 40 + "Ünïcödé ✓\n",
         "b.txt": "def f(x):\n    return x + 1  # a comment\n" * 30}


def test_tokenizer_round_trips_and_the_corpus_is_built_once(tmp_path):
    pattern = _write_texts(tmp_path / "src", TEXTS)
    folder = lm_text.build((pattern,), 300, tmp_path / "corpora")
    ids, meta, tok = lm_text.load((pattern,), 300, tmp_path / "corpora")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and meta["tokens"] == len(ids)
    assert meta["files"] == sorted(str(tmp_path / "src" / n) for n in TEXTS)
    assert meta["bytes"] == sum(len(t.encode()) for t in TEXTS.values())
    assert meta["tokenizer_vocab"] <= 300 and int(ids.max()) < 300
    # files joined by the end-of-text token (id 0); decoding gives the text back exactly
    eos = np.flatnonzero(np.asarray(ids) == tok.token_to_id(lm_text.EOS))
    assert tok.token_to_id(lm_text.EOS) == 0 and len(eos) == 2 and eos[-1] == len(ids) - 1
    assert tok.decode([int(i) for i in ids[:eos[0]]]) == TEXTS["a.txt"]
    assert tok.decode([int(i) for i in ids[eos[0] + 1:eos[1]]]) == TEXTS["b.txt"]
    assert len(ids) < 0.5 * meta["bytes"]  # BPE merges the repeated text
    mtime = (folder / "tokens.u16").stat().st_mtime_ns
    assert lm_text.build((pattern,), 300, tmp_path / "corpora") == folder  # kept, not rewritten
    assert (folder / "tokens.u16").stat().st_mtime_ns == mtime

    # a changed file is another corpus, and so another cached target
    cfg = llama.LlamaConfig(**TINY, text_files=(pattern,))
    stem = lm_cache.cache_stem(cfg, 0, tmp_path / "targets")
    (tmp_path / "src" / "b.txt").write_text(TEXTS["b.txt"] + "one more line\n")
    assert lm_text.build((pattern,), 300, tmp_path / "corpora") != folder
    assert lm_cache.cache_stem(cfg, 0, tmp_path / "targets") != stem
    capped = lm_text.build((pattern,), 300, tmp_path / "corpora", max_bytes=500)
    assert json.loads((capped / "tokens.json").read_text())["bytes"] == 500


def test_text_corpus_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="text_files pattern '.*nothing/\\*.txt' matches no file"):
        lm_text.resolve((str(tmp_path / "nothing" / "*.txt"),))
    monkeypatch.setattr(lm_text, "DEFAULT_FILES", (str(tmp_path / "no_docs" / "**/*.rst.txt"),))
    with pytest.raises(FileNotFoundError, match="apt-get install -y python3.11-doc"):
        lm_text.resolve(())
    pattern = _write_texts(tmp_path / "small", {"s.txt": "tiny"})
    with pytest.raises(ValueError, match="too few for windows of 128"):
        lm_text.load((pattern,), 300, tmp_path / "corpora", min_split=128)


def test_default_corpus_is_the_python_documentation(tmp_path):
    files = lm_text.resolve(())
    assert len(files) > 100 and all(str(f).endswith(".rst.txt") for f in files)
    ids, meta, tok = lm_text.load((), 512, tmp_path, max_bytes=100_000)
    assert meta["bytes"] == 100_000 and meta["tokenizer_vocab"] == 512
    assert "Python" in tok.decode([int(i) for i in ids[:5000]])


# ~65 s; the LM loop runs end to end in test_lm.py[ih], Llama's forward against NumPy here
@pytest.mark.slow
def test_tiny_llama_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("SPDJAX_CACHE", str(tmp_path / "cache"))
    pattern = _write_texts(tmp_path / "src", TEXTS)
    overrides = {"steps": 6, "target_steps": 12, "log_every": 3, "checkpoint_every": 3,
                 "C": 8, "batch_size": 8, "eval_batch_size": 8,
                 **{f"target_recipe.{k}": v for k, v in TINY.items()},
                 "target_recipe.n_layers": 1,  # one block: the same code, compiled faster
                 "target_recipe.text_files": pattern}
    config = configs.load("lm:llama_2x128", overrides)
    summary = train_and_evaluate(config, tmp_path / "run")
    for key in ("kl_ci_masked", "kl_stochastic", "kl_unmasked", "ce_target", "ce_ci_masked"):
        assert np.isfinite(summary[key]), key
    assert len(summary["alive"]) == 6  # every attention and MLP matrix of the block
    page = (tmp_path / "run" / "figures" / "top_contexts.html").read_text()
    assert page.count("<h2>") == 6 and ("fox" in page or "return" in page)  # decoded BPE
    (sidecar,) = (tmp_path / "cache" / "targets").glob("lm_custom-*_12steps_seed0_text*.json")
    meta = json.loads(sidecar.read_text())
    assert meta["recipe"]["text_files"] == [pattern] and len(meta["evals"]) >= 1
    assert np.isfinite(meta["target_val_ce"]) and meta["train_tokens"] == 12 * 32 * 8


def test_llama_vpd_config_names_the_grouped_heads():
    config = configs.load("lm:llama_2x128+vpd", {})
    units = config.losses.nonlinearity_locality.units
    assert units["blocks_1/attn/q"]["heads"] == 4 and units["blocks_1/attn/k"]["heads"] == 2
    assert units["blocks_0/mlp_in"] == "output" and len(units) == 12
    cfg = lm_model.VARIANTS["llama_4x192"]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads) == (4, 192, 6, 3)
    assert dataclasses.asdict(cfg)["text_files"] == ()
    assert os.path.basename(lm_text.DEFAULT_FILES[0]) == "*.rst.txt"
