"""A Llama-style transformer target: RMSNorm, rotary positions, a GELU MLP, grouped-query attention.

The architecture of the later reference implementation's ``LlamaSimpleMLP`` (goodfire-ai/spd,
``spd/pretrain/models/llama_simple_mlp.py``): pre-norm blocks ``x + attn(rms(x))``,
``x + mlp(rms(x))``, a final RMSNorm, no biases anywhere; queries and keys rotated by RoPE in the
"rotate half" form (base 10000) on the whole head; keys and values shared by groups of
``n_heads / n_kv_heads`` query heads (query head ``h`` reads key/value head
``h // (n_heads / n_kv_heads)``); the MLP a plain GELU (tanh form, no gate). Unlike the
reference, the embedding and unembedding are separate matrices (both are sites of their own).

Standard linen layers, decomposed through tracing, so the sites follow the family's names::

    embed                          token embedding
    blocks_<i>/attn/{q,k,v,out}    q, out: d_model x d_model; k, v: d_model x n_kv_heads * d_head
    blocks_<i>/mlp_in, mlp_out     the GELU MLP
    unembed                        d_model x vocab

The RMSNorm scales (``attn_norm``, ``mlp_norm``, ``final_norm``) are elementwise, not sites.
Variants (:data:`VARIANTS`), sized as the reference's SimpleStories models
(``ss_llama_simple_mlp-2L-128.yaml`` and ``-4L-192.yaml``: heads of 32, half as many key/value
heads, MLP 4 x d_model) with our own corpus, a 4096-token BPE vocabulary
(:mod:`spdjax.families.lm.text`; theirs: 4019) and windows of 128 tokens (theirs: 512, too long
for SPD on two CPU cores):

* ``llama_2x128``: 2 layers, d_model 128, 4 heads, 2 key/value heads, MLP 512;
* ``llama_4x192``: 4 layers, d_model 192, 6 heads, 3 key/value heads, MLP 768.

Both train with AdamW (betas 0.9 / 0.95, weight decay 0.1, gradient clipping at norm 1, the
reference's), a linear warm-up and a cosine decay to 10% of the peak lr, on the next-token CE at
every position.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from spdjax.core.ci_global import attention, rope

Array = jax.Array
MIN_VOCAB = 257  # the 256 byte symbols of the byte-level BPE + the end-of-text token


def _patterns(text_files) -> tuple[str, ...]:
    """``text_files`` as a tuple of glob patterns: a string is split on commas."""
    if isinstance(text_files, str):
        text_files = [p.strip() for p in text_files.split(",")]
        text_files = [p for p in text_files if p]
    if not isinstance(text_files, (tuple, list)) or not all(
            isinstance(p, str) and p.strip() for p in text_files):
        raise ValueError("text_files must be glob patterns: a tuple of non-empty strings, or one "
                         f"string of comma-separated patterns ('' for the default corpus); got "
                         f"{text_files!r}.")
    return tuple(text_files)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-style target, its text corpus and its training recipe."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    seq_len: int = 128  # tokens per training window (and the model's positions)
    vocab_size: int = 4096  # BPE tokens, trained on the corpus (spdjax.families.lm.text)
    text_files: tuple[str, ...] = ()  # glob patterns of text files; (): the Python docs
    corpus_bytes: int = 0  # at most this many bytes of text (0: every file)
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    final_lr_frac: float = 0.1  # cosine decay after warm-up to this fraction of lr
    grad_clip: float = 1.0  # global gradient norm (0: none)

    def __post_init__(self):
        object.__setattr__(self, "text_files", _patterns(self.text_files))
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_mlp", "seq_len", "steps",
                     "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads "
                             f"{self.n_heads}.")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"The head width d_model / n_heads = {self.d_model // self.n_heads} "
                             "must be even (rotary positions rotate pairs of channels).")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads "
                             f"{self.n_kv_heads} (each key/value head serves a group of query "
                             "heads).")
        if not MIN_VOCAB <= self.vocab_size <= 2 ** 16:
            raise ValueError(f"vocab_size must be in [{MIN_VOCAB}, 65536] (byte-level BPE, ids "
                             f"stored as uint16), got {self.vocab_size}.")
        if isinstance(self.corpus_bytes, bool) or not isinstance(self.corpus_bytes, int) or (
                self.corpus_bytes < 0):
            raise ValueError(f"corpus_bytes must be an integer >= 0 (0: every file), got "
                             f"{self.corpus_bytes!r}.")

    @property
    def data(self) -> str:
        """The family's name for this kind of data: BPE tokens of text files."""
        return "text"

    @property
    def vocab(self) -> int:
        """The model's vocabulary (the tokenizer's ids are below it)."""
        return self.vocab_size

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


VARIANTS = {
    "llama_2x128": LlamaConfig(128, 2, 4, 2, 512),
    "llama_4x192": LlamaConfig(192, 4, 6, 3, 768),
}


def _dense(features: int, name: str, std: float) -> nn.Dense:
    return nn.Dense(features, use_bias=False, name=name,
                    kernel_init=nn.initializers.normal(std))


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with rotary positions, no biases."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        *lead, T, _ = x.shape
        H, G, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)  # the reference's residual-projection init
        q = _dense(H * dh, "q", 0.02)(x).reshape(*lead, T, H, dh)
        k = _dense(G * dh, "k", 0.02)(x).reshape(*lead, T, G, dh)
        v = _dense(G * dh, "v", 0.02)(x).reshape(*lead, T, G, dh)
        q, k = rope(q, cfg.rope_base), rope(k, cfg.rope_base)
        k, v = jnp.repeat(k, H // G, axis=-2), jnp.repeat(v, H // G, axis=-2)  # [..., T, H, dh]
        mixed = attention(q, k, v, causal=True).reshape(*lead, T, H * dh)
        return _dense(cfg.d_model, "out", out_std)(mixed)


class LlamaBlock(nn.Module):
    """``x + attn(rms(x))``, then ``x + mlp_out(gelu(mlp_in(rms(x))))``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = x + LlamaAttention(cfg, name="attn")(
            nn.RMSNorm(epsilon=cfg.norm_eps, name="attn_norm")(x))
        h = _dense(cfg.d_mlp, "mlp_in", 0.02)(nn.RMSNorm(epsilon=cfg.norm_eps, name="mlp_norm")(x))
        return x + _dense(cfg.d_model, "mlp_out", 0.02 / math.sqrt(2 * cfg.n_layers))(
            nn.gelu(h, approximate=True))


def check_length(ids, seq_len: int) -> None:
    """Refuses ``ids`` longer than the model's ``seq_len`` positions (both LM architectures)."""
    if ids.shape[-1] > seq_len:
        raise ValueError(f"Sequences of {ids.shape[-1]} tokens are longer than the model's "
                         f"{seq_len} positions.")


class Llama(nn.Module):
    """``ids [..., T] -> logits [..., T, vocab]``."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, ids):
        cfg = self.cfg
        check_length(ids, cfg.seq_len)
        x = nn.Embed(cfg.vocab, cfg.d_model, name="embed",
                     embedding_init=nn.initializers.normal(0.02))(ids)
        for i in range(cfg.n_layers):
            x = LlamaBlock(cfg, name=f"blocks_{i}")(x)
        x = nn.RMSNorm(epsilon=cfg.norm_eps, name="final_norm")(x)
        return _dense(cfg.vocab, "unembed", 0.02)(x)
