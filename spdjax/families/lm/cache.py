"""The transformer target cache: trained targets on disk, keyed by variant (or a hash of a
changed recipe), steps and seed (and, for text corpora, the SHA-256 of the text), with their
quality on the evaluation batch; and the one-line report of a cached target.

A module of its own because it needs both :mod:`~spdjax.families.lm.model` (the recipe) and
:mod:`~spdjax.families.lm.evaluation` (the trained target's quality), which imports model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np

from spdjax.families.lm import evaluation
from spdjax.families.lm import model as lm_model
from spdjax.families.lm import text as lm_text
from spdjax.families.lm.model import LMConfig
from spdjax.training import targets as target_training

# Steps per jitted chunk of target training: one progress line (and, for the corpus targets, one
# validation CE) per chunk, i.e. every few seconds (ih) to a minute (llama_2x128) on 2 CPU cores.
CHUNK_STEPS = 100


def _text_id(cfg) -> str | None:
    """The SHA-256 of a text recipe's corpus (None for the other data)."""
    return lm_text.corpus_id(cfg.text_files, cfg.corpus_bytes) if cfg.data == "text" else None


def cache_stem(cfg: LMConfig, seed: int, cache_dir) -> str:
    """``lm_<variant>_<steps>steps_seed<s>``; a changed recipe is ``lm_custom-<hash>_...``; a
    text corpus adds ``_text<first 8 hex of its SHA-256>`` (changed files: another target)."""
    name = next((k for k, v in lm_model.VARIANTS.items() if v == cfg), None)
    if name is None:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
        name = f"custom-{digest.hexdigest()[:8]}"
    text_id = _text_id(cfg)
    suffix = f"_text{text_id[:8]}" if text_id else ""
    return os.path.join(os.fspath(cache_dir), f"lm_{name}_{cfg.steps}steps_seed{seed}{suffix}")


def load_or_train_target(cfg: LMConfig, seed: int, cache_dir) -> dict:
    """The trained target params for ``cfg`` and ``seed`` (cached, recipe-checked)."""
    recipe = dataclasses.asdict(cfg)
    text_id = _text_id(cfg)
    if text_id:
        recipe["text_sha256"] = text_id

    def train():
        params, info = target_training.train(lm_model.make_trainer, cfg, cfg.steps, seed,
                                             what=f"LM {cfg.data}", chunk_steps=CHUNK_STEPS)
        meta = {"seconds": info["seconds"], "final_loss": info["final_loss"],
                "losses": info["losses"], "evals": info["evals"],
                **evaluation.target_quality(params, cfg, info["eval_key"])}
        if cfg.data != "induction":  # the whole validation split, not the evaluation batch
            meta["target_val_ce"] = lm_model.split_ce(params, cfg, "val")
            meta["train_tokens"] = cfg.steps * cfg.batch_size * cfg.seq_len
        if cfg.data == "text":
            _, corpus, _ = lm_model.text_corpus(cfg)
            meta["corpus"] = {k: corpus[k] for k in ("bytes", "tokens", "text_sha256",
                                                     "tokenizer_vocab")}
            meta["corpus"]["files"] = len(corpus["files"])
        return params, meta

    return target_training.load_or_train(
        cache_stem(cfg, seed, cache_dir), recipe, f"LM {cfg.data}", train)


def report(params: dict, cfg: LMConfig, meta: dict, stem: str) -> str:
    """One line on a cached target: its size, training time and loss, and its quality on the
    evaluation batch (and the whole validation split for the corpus targets)."""
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    quality = ", ".join(f"{k} {v:.4g}" for k, v in meta.items()
                        if k.startswith("target_") and isinstance(v, float))
    tokens = f" on {meta['train_tokens']:,} tokens" if "train_tokens" in meta else ""
    return (f"LM target {cfg.data} ({n} params) cached at {stem}.npz: trained "
            f"{meta['seconds']:.0f} s{tokens}, final training loss {meta['final_loss']:.4g}; "
            f"{quality}.")
