"""Transformer targets: the induction-head toy, a small byte-level language model, and
Llama-style models on English text (:mod:`spdjax.families.lm.llama`).

One linen model, written with standard layers and decomposed through tracing
(:func:`spdjax.from_linen`), so its sites are module paths:

    embed                      token embedding (an ``embed`` site)
    blocks_<i>/attn/{q,k,v,out}  causal multi-head attention projections, no biases
    blocks_<i>/mlp_in, mlp_out   GELU MLP (when ``d_mlp > 0``)
    unembed                    the unembedding, no bias

Positions: ``"qk_sinusoidal"`` adds Shortformer-style sinusoids to the inputs of Q and K only
(the induction toy of the later reference implementation, goodfire-ai/spd); ``"learned"`` adds a
learned ``pos_embed`` to the residual stream (GPT-2 style). Variants (``VARIANTS``):

* ``ih``: the reference's ``train_ih.py`` defaults: V = 128 (+ BOS and the induction token),
  sequences of 64, d_model 16, 1 head, 2 attention-only layers, no LayerNorm; AdamW lr 1e-3,
  wd 0.01, 1000-step linear warm-up, CE on the last position only. We train 4000 steps of 256
  (the reference: 100k of 1024): enough for accuracy 1.000 at the induction position
  (RESULTS.md).
* ``bytes``: 2 pre-LN blocks, d_model 64, 4 heads, MLP 256, sequences of 128 bytes of the
  standard library's source (:mod:`spdjax.families.lm.data`); next-token CE on every
  position; AdamW lr 3e-3 (warm-up 200, cosine to 10%), wd 0.1, 4000 steps of batch 32. Small
  enough that SPD with C above every matrix's rank runs on 2 CPU cores.
* ``llama_2x128``, ``llama_4x192``: :class:`~spdjax.families.lm.llama.Llama` (RMSNorm, RoPE,
  GELU MLP, grouped-query attention) on BPE tokens of text files
  (:mod:`spdjax.families.lm.text`; by default the Python documentation), next-token CE on every
  position; the same site names.

The functions below take either recipe (:class:`LMConfig` or
:class:`~spdjax.families.lm.llama.LlamaConfig`); :func:`module` is the linen model of either.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from spdjax.core.adapters import from_linen
from spdjax.training import targets as target_training
from spdjax.families.lm import data as lm_data
from spdjax.families.lm import llama
from spdjax.families.lm import text as lm_text
from spdjax.core.target import Target

Array = jax.Array
POSITIONS = ("qk_sinusoidal", "learned")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A transformer target, its data and its training recipe."""

    data: str  # "induction" | "bytes"
    n_tokens: int  # induction: V (model vocabulary V + 2); bytes: 256
    seq_len: int
    d_model: int
    n_heads: int
    n_layers: int
    d_mlp: int = 0  # 0: attention only
    layer_norm: bool = False
    positions: str = "qk_sinusoidal"
    prefix_window: int = 61  # induction: "S M" starts in [1, prefix_window)
    corpus_bytes: int = 8_000_000  # bytes: corpus size
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    final_lr_frac: float = 1.0  # cosine decay after warm-up to this fraction (1.0: constant)

    def __post_init__(self):
        if self.data not in ("induction", "bytes"):
            raise ValueError(f"Unknown LM data {self.data!r}; expected 'induction' or 'bytes'.")
        if self.positions not in POSITIONS:
            raise ValueError(f"Unknown positions {self.positions!r}; expected one of {POSITIONS}.")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}.")
        if self.data == "induction" and not 1 < self.prefix_window <= self.seq_len - 2:
            raise ValueError(f"prefix_window must be in (1, seq_len - 2]; "
                             f"got {self.prefix_window}.")
        if self.data == "bytes":  # before a corpus is built or a target trained
            lm_data.check_corpus_bytes(self.corpus_bytes, self.seq_len)

    @property
    def vocab(self) -> int:
        """The model's vocabulary: V + BOS + induction token, or the byte alphabet."""
        return self.n_tokens + 2 if self.data == "induction" else self.n_tokens


VARIANTS = {
    "ih": LMConfig("induction", 128, 64, 16, 1, 2),
    "bytes": LMConfig("bytes", 256, 128, 64, 4, 2, d_mlp=256, layer_norm=True,
                      positions="learned", steps=4000, batch_size=32, lr=3e-3,
                      weight_decay=0.1, warmup_steps=200, final_lr_frac=0.1),
    **llama.VARIANTS,
}
VAL_WINDOWS = 64  # validation windows scored after each chunk of target training


def sinusoids(n: int, d: int) -> Array:
    """``[n, d]`` sinusoidal position codes (sin on even, cos on odd features)."""
    pos = jnp.arange(n)[:, None]
    freq = jnp.exp(-math.log(10_000.0) * jnp.arange(0, d, 2) / d)
    codes = jnp.zeros((n, d))
    codes = codes.at[:, 0::2].set(jnp.sin(pos * freq))
    return codes.at[:, 1::2].set(jnp.cos(pos * freq[: d // 2]))


class Attention(nn.Module):
    """Causal multi-head self-attention without biases; ``qk_pos`` is added to the inputs of Q and
    K only (zero for learned positions)."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, x, qk_pos):
        cfg = self.cfg
        *lead, T, D = x.shape
        H = cfg.n_heads
        heads = lambda a: a.reshape(*lead, T, H, D // H)  # noqa: E731
        q = heads(nn.Dense(D, use_bias=False, name="q")(x + qk_pos))
        k = heads(nn.Dense(D, use_bias=False, name="k")(x + qk_pos))
        v = heads(nn.Dense(D, use_bias=False, name="v")(x))
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(D // H)
        causal = jnp.tril(jnp.ones((T, T), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
        mixed = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(*lead, T, D)
        return nn.Dense(D, use_bias=False, name="out")(mixed)


class Block(nn.Module):
    """One transformer block: attention, then (when ``cfg.d_mlp``) a GELU MLP, each residual,
    pre-LayerNorm when ``cfg.layer_norm``."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, x, qk_pos):
        cfg = self.cfg
        norm = (lambda name: nn.LayerNorm(name=name)) if cfg.layer_norm else (
            lambda name: (lambda a: a))
        x = x + Attention(cfg, name="attn")(norm("ln_attn")(x), qk_pos)
        if cfg.d_mlp:
            h = nn.gelu(nn.Dense(cfg.d_mlp, name="mlp_in")(norm("ln_mlp")(x)))
            x = x + nn.Dense(cfg.d_model, name="mlp_out")(h)
        return x


class Transformer(nn.Module):
    """``ids [..., T] -> logits [..., T, vocab]``."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, ids):
        cfg = self.cfg
        T = ids.shape[-1]
        llama.check_length(ids, cfg.seq_len)
        x = nn.Embed(cfg.vocab, cfg.d_model, name="embed")(ids)
        qk_pos = 0.0
        if cfg.positions == "learned":
            x = x + nn.Embed(cfg.seq_len, cfg.d_model, name="pos_embed")(jnp.arange(T))
        else:
            qk_pos = sinusoids(T, cfg.d_model)
        for i in range(cfg.n_layers):
            x = Block(cfg, name=f"blocks_{i}")(x, qk_pos)
        if cfg.layer_norm:
            x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(cfg.vocab, use_bias=False, name="unembed")(x)


def module(cfg: LMConfig | llama.LlamaConfig) -> nn.Module:
    """The linen model of a recipe: :class:`Transformer` or :class:`~.llama.Llama`."""
    return llama.Llama(cfg) if isinstance(cfg, llama.LlamaConfig) else Transformer(cfg)


def example_ids(cfg: LMConfig, batch: int = 1) -> Array:
    """``[batch, seq_len]`` zeros: an input of the right shape for init and tracing."""
    return jnp.zeros((batch, cfg.seq_len), jnp.int32)


def init_params(key: Array, cfg: LMConfig) -> dict:
    """Freshly initialised (untrained) params of the model (:func:`module`) for ``cfg``
    (compiled as one program: flax's init run op by op compiles each op on its own, about twice
    the time on CPU)."""
    return jax.jit(module(cfg).init)(key, example_ids(cfg))["params"]


def target(cfg: LMConfig) -> Target:
    """The transformer as a traced :class:`~spdjax.core.target.Target` (``[B, T]`` ids in)."""
    model = module(cfg)
    params = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    return from_linen(model, {"params": params}, example_ids(cfg))[0]


# ------------------------------------------------------------------------------------ data


def corpus_tokens(cfg: LMConfig, which: str) -> Array:
    """A split of the byte corpus, or of the text corpus's token ids, as a device array (built
    once into the target cache, read from disk once per process)."""
    if cfg.data == "text":
        return _text_split(cfg.text_files, cfg.vocab_size, cfg.corpus_bytes, _corpus_dir(),
                           cfg.seq_len, which)
    return _corpus_split(_corpus_dir(), cfg.corpus_bytes, which)


def text_corpus(cfg: llama.LlamaConfig):
    """``(ids, meta, tokenizer)`` of a text recipe's corpus (:func:`spdjax.families.lm.text.load`;
    read once per process: files changed while it runs are seen by the next process)."""
    return _text_corpus(cfg.text_files, cfg.vocab_size, cfg.corpus_bytes, _corpus_dir(),
                        cfg.seq_len)


@functools.lru_cache(maxsize=4)
def _text_corpus(patterns, vocab_size, corpus_bytes, corpora_dir, seq_len):
    return lm_text.load(patterns, vocab_size, corpora_dir, max_bytes=corpus_bytes,
                        min_split=seq_len)


@functools.lru_cache(maxsize=8)
def _text_split(patterns, vocab_size, corpus_bytes, corpora_dir, seq_len, which) -> Array:
    ids, _, _ = _text_corpus(patterns, vocab_size, corpus_bytes, corpora_dir, seq_len)
    return _device_array(lm_data.split(ids, which))


@functools.lru_cache(maxsize=4)
def _corpus_split(corpus_dir: str, corpus_bytes: int, which: str) -> Array:
    tokens, _ = lm_data.load_corpus(corpus_dir, corpus_bytes)
    return _device_array(lm_data.split(tokens, which))


def _device_array(x) -> Array:
    """``x`` on the device, concrete even when the first call comes while tracing (a sampler
    under ``jax.jit``): the cached split must not be that trace's tracer."""
    with jax.ensure_compile_time_eval():
        return jnp.asarray(np.asarray(x))


def _corpus_dir():
    return os.path.join(os.path.dirname(target_training.default_cache_dir()), "corpora")


def sample(cfg: LMConfig, key: Array, batch_size: int, which: str = "train") -> Array:
    """``[batch, seq_len]`` ids: SPD's training data (the target's input distribution)."""
    if cfg.data == "induction":
        return induction(cfg, key, batch_size)[0]
    return lm_data.window_batch(corpus_tokens(cfg, which), key, batch_size, cfg.seq_len)


def induction(cfg: LMConfig, key: Array, batch_size: int) -> tuple[Array, Array]:
    """``(ids [batch, seq_len], labels [batch])``: induction sequences and the answer at the
    last position (:func:`spdjax.families.lm.data.induction_batch`)."""
    return lm_data.induction_batch(key, batch_size, vocab=cfg.n_tokens, seq_len=cfg.seq_len,
                                   prefix_window=cfg.prefix_window)


def sites(cfg: LMConfig, config) -> dict[str, int]:
    """Every attention projection, and the MLPs when there are any, with ``config.C`` each."""
    patterns = {"blocks_*/attn/*": config.C}
    if cfg.d_mlp:
        patterns["blocks_*/mlp_*"] = config.C
    return patterns


# -------------------------------------------------------------------------------- training


def next_token_ce(logits: Array, ids: Array) -> Array:
    """Mean CE of predicting ``ids[:, t+1]`` from position ``t``."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def split_ce(params: dict, cfg: LMConfig, which: str = "val", *, batch: int = 32) -> float:
    """Next-token CE of the trained model over every non-overlapping ``seq_len`` window of a
    corpus split (the byte or text corpus), ``batch`` windows per forward pass."""
    tokens = corpus_tokens(cfg, which)
    n = tokens.shape[0] // cfg.seq_len
    windows = tokens[: n * cfg.seq_len].reshape(n, cfg.seq_len).astype(jnp.int32)
    model = module(cfg)
    ce = jax.jit(lambda p, ids: next_token_ce(model.apply({"params": p}, ids), ids))
    total, count = 0.0, 0
    for start in range(0, n, batch):  # the last, shorter batch compiles once more
        ids = windows[start:start + batch]
        total += float(ce(params, ids)) * ids.shape[0]
        count += ids.shape[0]
    return total / count


def last_position_ce(logits: Array, labels: Array) -> Array:
    """Mean CE of predicting ``labels`` from the last position (the induction toy's loss)."""
    logp = jax.nn.log_softmax(logits[:, -1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def make_trainer(cfg: LMConfig) -> target_training.TargetTrainer:
    """The variant's target recipe: AdamW with linear warm-up and cosine decay on the
    next-token CE (the induction toy: CE at the last position only); the corpus targets report
    the CE on VAL_WINDOWS fixed validation windows after every chunk of steps."""
    model = module(cfg)
    corpus = cfg.data != "induction"
    tokens = corpus_tokens(cfg, "train") if corpus else None

    def loss(params, frozen, batch):
        del frozen
        if cfg.data == "induction":
            ids, labels = batch
            return last_position_ce(model.apply({"params": params}, ids), labels)
        return next_token_ce(model.apply({"params": params}, batch), batch)

    def sample_batch(key):
        if cfg.data == "induction":
            return induction(cfg, key, cfg.batch_size)
        return lm_data.window_batch(tokens, key, cfg.batch_size, cfg.seq_len)

    evaluate = None
    if corpus:
        val_ids = lm_data.window_batch(corpus_tokens(cfg, "val"), jax.random.key(0),
                                       VAL_WINDOWS, cfg.seq_len)
        evaluate = jax.jit(lambda params, frozen: {
            "val_ce": next_token_ce(model.apply({"params": params}, val_ids), val_ids)})

    warm = max(cfg.warmup_steps, 1)
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, cfg.lr, warm),
        optax.cosine_decay_schedule(cfg.lr, max(cfg.steps - warm, 1), alpha=cfg.final_lr_frac),
    ], [warm])
    if isinstance(cfg, llama.LlamaConfig):  # the reference's LlamaSimpleMLP recipe
        optimizer = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay)
        if cfg.grad_clip:
            optimizer = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optimizer)
    else:
        optimizer = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    return target_training.TargetTrainer(
        init=lambda key: (jax.jit(init_params, static_argnums=1)(key, cfg), {}), loss=loss,
        sample=sample_batch, optimizer=optimizer, evaluate=evaluate)
