"""The transformer family: induction data, the byte corpus, the traced target, and tiny runs of
both configs end to end through the CLI's function."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.config import files as configs
from spdjax.families.lm import data as lm_data
from spdjax.families.lm import model as lm_model
from spdjax.config.runs import train_and_evaluate


def test_induction_sequences_follow_the_reference_layout():
    ids, labels = lm_data.induction_batch(jax.random.key(0), 256, vocab=10, seq_len=16,
                                          prefix_window=13)
    ids, labels = np.asarray(ids), np.asarray(labels)
    S = 11
    assert ids.shape == (256, 16) and (ids[:, 0] == lm_data.BOS).all() and (ids[:, -1] == S).all()
    for row, m in zip(ids, labels):
        (pos,) = np.flatnonzero(row[:-1] == S)  # exactly one "S M" before the final S
        assert 1 <= pos < 13 and row[pos + 1] == m and 1 <= m <= 10
        assert ((row[1:-1] >= 1) & (row[1:-1] <= S)).all()


def test_byte_corpus_is_built_once_memory_mapped_and_windowed(tmp_path):
    stem = lm_data.build_corpus(tmp_path, 20_000)
    assert stem.with_suffix(".json").name.endswith("_20000b.json")  # the size is in the name
    data, meta = lm_data.load_corpus(tmp_path, 20_000)
    assert isinstance(data, np.memmap) and meta["bytes"] == len(data) == 20_000
    assert meta["files"] >= 1 and meta["vocab"] == 256 and 0 not in set(data[:100].tolist())
    mtime = stem.with_suffix(".u8").stat().st_mtime_ns
    lm_data.build_corpus(tmp_path, 20_000)  # kept, not rewritten
    assert stem.with_suffix(".u8").stat().st_mtime_ns == mtime
    train, val = lm_data.split(data, "train"), lm_data.split(data, "val")
    assert len(train) + len(val) == 20_000 and len(val) == 1000
    tokens = jnp.asarray(np.asarray(train))
    batch = np.asarray(lm_data.window_batch(tokens, jax.random.key(0), 8, 32))
    text = bytes(np.asarray(train))
    assert batch.shape == (8, 32) and all(bytes(row.astype(np.uint8)) in text for row in batch)
    with pytest.raises(ValueError, match="Unknown corpus split 'test'"):
        lm_data.split(data, "test")
    with pytest.raises(ValueError, match="too few for windows"):
        lm_data.window_batch(tokens[:10], jax.random.key(0), 2, 32)


def test_a_corpus_split_first_read_under_jit_is_cached_concrete(tmp_path, monkeypatch):
    """A sampler jitted before anything read the corpus (a harvest's first batch) caches the
    split itself, not that trace's tracer: a second trace reads it again."""
    monkeypatch.setenv("SPDJAX_CACHE", str(tmp_path / "cache"))
    cfg = dataclasses.replace(lm_model.VARIANTS["bytes"], corpus_bytes=20_000)
    lm_data.build_corpus(lm_model._corpus_dir(), 20_000)
    lm_model._corpus_split.cache_clear()
    first = jax.jit(lambda k: lm_model.sample(cfg, k, 2))(jax.random.key(0))
    second = jax.jit(lambda k: lm_model.sample(cfg, k, 3))(jax.random.key(0))  # a new trace
    assert first.shape == (2, cfg.seq_len) and second.shape == (3, cfg.seq_len)
    assert not isinstance(lm_model.corpus_tokens(cfg, "train"), jax.core.Tracer)
    lm_model._corpus_split.cache_clear()  # the next test's corpus is its own


def test_transformer_target_sites_and_bad_inputs():
    cfg = dataclasses.replace(lm_model.VARIANTS["bytes"], d_model=16, n_heads=2, d_mlp=24)
    target = lm_model.target(cfg)
    attn = {f"blocks_{i}/attn/{p}" for i in range(2) for p in "qkvo" if p != "o"}
    attn |= {f"blocks_{i}/attn/out" for i in range(2)}
    mlp = {f"blocks_{i}/{m}" for i in range(2) for m in ("mlp_in", "mlp_out")}
    assert attn | mlp | {"embed", "pos_embed", "unembed"} == set(target.sites)
    assert target.sites["blocks_1/mlp_in"].d_out == 24
    tp = jax.jit(lm_model.init_params, static_argnums=1)(jax.random.key(0), cfg)  # one compile
    with pytest.raises(ValueError, match="Sequences of 129 tokens are longer than the model's 128"):
        target(tp, jnp.zeros((1, 129), jnp.int32))
    d = spdjax.decompose(target, {"embed": 4, "blocks_0/attn/*": 4})
    params = jax.jit(d.init)(jax.random.key(1), tp)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\); got ids from 0 to 300"):
        spdjax.make_context(d, tp, params, jnp.array([[0, 300]]))


@pytest.mark.parametrize("variant", ["ih", pytest.param("bytes", marks=pytest.mark.slow)])
def test_tiny_run_end_to_end(variant, tmp_path, monkeypatch):
    monkeypatch.setenv("SPDJAX_CACHE", str(tmp_path / "cache"))
    overrides = {"steps": 2, "target_steps": 2, "log_every": 1, "checkpoint_every": 2,
                 "C": 8, "batch_size": 8, "eval_batch_size": 8}
    if variant == "ih":  # short sequences of a small vocabulary: the same code, run faster
        overrides.update({"target_recipe.seq_len": 16, "target_recipe.n_tokens": 10,
                          "target_recipe.prefix_window": 13, "target_recipe.batch_size": 16})
    config = configs.load(f"lm:{variant}", overrides)
    if variant == "bytes":  # a narrow model on a small corpus: the same code, compiled faster
        with config.unlocked():
            config.target_recipe.update(corpus_bytes=100_000, d_model=16, n_heads=2, d_mlp=24,
                                        seq_len=32)
    summary = train_and_evaluate(config, tmp_path / "run")
    for key in ("kl_ci_masked", "kl_stochastic", "kl_unmasked", "ce_target", "ce_ci_masked"):
        assert np.isfinite(summary[key]), key
    assert set(summary["ci_l0_per_token"]) == set(summary["alive"])
    figures = {p.name for p in (tmp_path / "run" / "figures").iterdir()}
    assert "ci_l0_per_site.png" in figures
    if variant == "ih":
        assert len(summary["alive"]) == 8 and "ci_l0_induction_position" in summary
        assert "induction_ci.png" in figures
    else:
        assert len(summary["alive"]) == 12
        page = (tmp_path / "run" / "figures" / "top_contexts.html").read_text()
        assert page.count("<h2>") == 12 and "subcomponent" in page
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_top_contexts_page_shows_where_each_subcomponent_matters(tmp_path):
    from spdjax.families.lm import plots

    ids = np.frombuffer(b"def f(x):\n    return x\n" * 4, np.uint8).reshape(4, -1).astype(np.int32)
    ci = np.zeros((4, ids.shape[1], 3), np.float32)
    ci[2, 5, 1] = 0.9  # subcomponent 1 matters only at token 5 of sequence 2
    ci[..., 0] = 0.5
    page = plots.write_top_contexts({"blocks_0/mlp_in": ci}, ids, tmp_path / "p.html").read_text()
    assert page.count("<h3>") == 3
    first_ctx = page.split("subcomponent 1:")[1]
    assert first_ctx.count("<pre>") == 1  # contexts where its CI is 0 are not listed
    assert "CI 0.90 | def f<b>(</b>" in first_ctx
    assert "tokens with CI &gt; 0.5: <code>&#x27;(&#x27;</code> 100%" in first_ctx
    # four identical sequences: every context of subcomponent 0 is shown once, not four times
    zeroth = page.split("subcomponent 0:")[1].split("<h3>")[0]
    shown = [line for line in zeroth.splitlines() if line.startswith("<pre>")]
    assert len(shown) == plots.CONTEXTS and len(set(shown)) == len(shown)
