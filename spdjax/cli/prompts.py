"""Prompts for the per-prompt commands (``spdjax.cli.attribution_graph``,
``spdjax.cli.intervene``): text to a ``[1, T]`` batch and ids back to text, per family.

Where a prompt's encoding comes from, first that applies:

1. the family's hook: a :class:`~spdjax.training.family.Family` (or subclass) with an attribute
   ``prompt_codec(model_config) -> (encode, decode)``, ``encode(text) -> ids`` (a 1-D int
   sequence) and ``decode(id) -> str``;
2. the transformer family's built-in kinds (``model_config.data``): the induction toy reads
   space-separated token ids (``0`` is BOS, ``V + 1`` the induction token ``S``; ``BOS`` and
   ``S`` may be written as such), the byte LM the prompt's UTF-8 bytes, and a text (Llama) LM
   the prompt's text in its corpus's BPE tokenizer (:func:`spdjax.families.lm.model.
   text_corpus`, the tokenizer the viewer and the harvest page decode with), or its ids when
   the prompt is space-separated integers only;
3. anything else: space-separated numbers (integers: token ids; otherwise a float vector).

:func:`positions` reads the commands' ``--position`` list (empty: the default, the last
position of a sequence output and the one output of a model without positions).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from spdjax.cli import common
from spdjax.families.lm import model as lm_model
from spdjax.config.runs import load


@dataclasses.dataclass(frozen=True)
class Codec:
    """``encode(text) -> [1, T]`` batch and ``decode(id) -> str``."""

    encode: Callable[[str], np.ndarray]
    decode: Callable[[int], str] | None


def _numbers(text: str) -> np.ndarray:
    parts = text.split()
    try:
        return np.array([[int(p) for p in parts]], np.int32)
    except ValueError:
        pass
    try:
        return np.array([[float(p) for p in parts]], np.float32)
    except ValueError:
        raise ValueError(f"Prompt {text!r} is not space-separated numbers (token ids, or the "
                         "values of a float input).") from None


def _induction(cfg) -> Codec:
    S = cfg.n_tokens + 1
    names = {"BOS": 0, "S": S}

    def encode(text):
        ids = []
        for p in text.split():
            try:
                ids.append(names[p] if p in names else int(p))
            except ValueError:
                raise ValueError(f"Induction-toy prompt token {p!r} is not an id in [0, "
                                 f"{cfg.vocab}) or BOS / S.") from None
        bad = [i for i in ids if not 0 <= i < cfg.vocab]
        if bad:
            raise ValueError(f"Induction-toy prompt ids {bad} are outside [0, {cfg.vocab}) "
                             f"(0 = BOS, 1..{cfg.n_tokens} tokens, {S} = S).")
        return np.array([ids], np.int32)

    return Codec(encode, lambda i: {0: "BOS", S: "S"}.get(int(i), str(int(i))))


def _bytes(_cfg) -> Codec:
    def decode(i):
        c = chr(int(i))
        if c == " ":
            return "␣"
        return c if c.isprintable() else repr(c)[1:-1]

    return Codec(lambda text: np.frombuffer(text.encode("utf-8"), np.uint8).astype(
        np.int32)[None], decode)


def _text(cfg) -> Codec:
    """A text (Llama) LM: the prompt encoded by its corpus's tokenizer, or read as ids when it
    is space-separated integers; tokens decoded by the same tokenizer. A corpus that cannot be
    read (files gone) leaves ids only, and a text prompt then says why."""
    try:
        tok = lm_model.text_corpus(cfg)[2]
    except (OSError, ValueError) as e:
        tok, why = None, f"{type(e).__name__}: {e}"

    def encode(text):
        parts = text.split()
        if parts and all(p.lstrip("-").isdigit() for p in parts):
            ids = [int(p) for p in parts]
        elif tok is None:
            raise ValueError(f"The prompt {text!r} is text, and this run's tokenizer cannot be "
                             f"read ({why}); type token ids (space-separated integers).")
        else:
            ids = tok.encode(text).ids
        bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ValueError(f"Token ids {bad} are outside the vocabulary [0, {cfg.vocab_size}).")
        return np.array([ids], np.int32)

    decode = None if tok is None else (
        lambda i: tok.decode([int(i)], skip_special_tokens=False))
    return Codec(encode, decode)


BUILT_IN = {"induction": _induction, "bytes": _bytes, "text": _text}


def codec(run) -> Codec:
    """The prompt encoding of a loaded run (module docstring)."""
    cfg = run.experiment.model_config
    hook = getattr(run.experiment.family, "prompt_codec", None)
    if hook is not None:
        encode, decode = hook(cfg)
        return Codec(lambda text: np.asarray(encode(text), np.int32).reshape(1, -1), decode)
    kind = getattr(cfg, "data", None)
    if run.experiment.family.name == "lm" and kind in BUILT_IN:
        return BUILT_IN[kind](cfg)
    return Codec(_numbers, None)


def prompt_batch(run, text: str) -> tuple[np.ndarray, Codec]:
    """``([1, T] batch, codec)`` of ``text``; an empty prompt, or one longer than the model's
    context (``model_config.seq_len``), is a ``ValueError``."""
    if not text or not text.strip():
        raise ValueError("The prompt is empty: pass --prompt with at least one token.")
    c = codec(run)
    batch = c.encode(text)
    if batch.size == 0:
        raise ValueError(f"The prompt {text!r} encodes to no tokens.")
    ctx = getattr(run.experiment.model_config, "seq_len", None)
    if ctx is not None and batch.ndim == 2 and np.issubdtype(batch.dtype, np.integer) and (
            batch.shape[1] > ctx):
        raise ValueError(f"The prompt is {batch.shape[1]} tokens long; the model's context is "
                         f"{ctx} positions.")
    return batch, c


def load_prompt(workdir, step: int | None, text: str):
    """``(run, [1, T] batch, codec)``: the run in ``workdir`` at ``step`` (None: the latest)
    and ``text`` encoded for it (:func:`prompt_batch`)."""
    run = load(workdir, step=step)
    batch, c = prompt_batch(run, text)
    return run, batch, c


def positions(values) -> list[int]:
    """``--position`` values as ints (``[]``: the default); a ``ValueError`` naming them if one
    is not an integer."""
    return common.int_list("--position", values, "-1")
