"""Text corpora for the Llama-style targets: text files, a local BPE tokenizer, memory-mapped ids.

A corpus is the text of the files that some glob patterns match (sorted, each once), joined with
an end-of-text token between files, optionally capped at ``max_bytes`` of UTF-8. By default it is
the Python documentation's reStructuredText sources that Debian's ``python3.11-doc`` package
installs (:data:`DEFAULT_FILES`, English prose with code examples; nothing downloaded at run
time). A byte-level BPE tokenizer of ``vocab_size`` tokens is trained on the first 95% of the
text with the ``tokenizers`` package, and the token ids are written as a ``uint16`` file with a
JSON sidecar (files, bytes, token count, SHA-256 of the text and of the ids):

    <corpora dir>/text_<sha256 of the text, 12 hex>_v<vocab_size>/
        tokenizer.json   tokens.u16   tokens.json

The folder is named after the text itself, so a changed, added or removed file gives another
corpus (and, through :func:`corpus_id`, another cached target); an existing complete one is
reused. The last 5% of the ids are the validation split (:func:`spdjax.families.lm.data.split`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from spdjax.families.lm import data as lm_data

DEFAULT_FILES = ("/usr/share/doc/python3.11/html/_sources/**/*.rst.txt",)
INSTALL_HINT = "sudo apt-get install -y python3.11-doc"
EOS = "<|endoftext|>"  # between files; token id 0


def resolve(patterns: Sequence[str]) -> list[pathlib.Path]:
    """The files matched by ``patterns`` (``**`` recursive, ``~`` expanded), sorted and each once;
    ``()`` means :data:`DEFAULT_FILES`. A pattern that matches no file is a ``ValueError`` (the
    default corpus missing: a ``FileNotFoundError`` naming the package to install)."""
    default = not patterns
    found: set[pathlib.Path] = set()
    for pattern in patterns or DEFAULT_FILES:
        matches = [pathlib.Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
        matches = [p for p in matches if p.is_file()]
        if not matches and default:
            raise FileNotFoundError(
                f"The default text corpus (the Python documentation's sources, {pattern}) is not "
                f"installed; install it with `{INSTALL_HINT}`, or point "
                "--config.target_recipe.text_files at text files of your own.")
        if not matches:
            raise ValueError(f"text_files pattern {pattern!r} matches no file; give glob "
                             "patterns of existing text files (e.g. 'corpus/**/*.txt').")
        found.update(matches)
    return sorted(found)


def read_text(files: Sequence[pathlib.Path], max_bytes: int = 0) -> list[str]:
    """The files' texts (UTF-8, undecodable bytes replaced), at most ``max_bytes`` of UTF-8 in all
    (0: no cap); the end-of-text token is removed from inside them."""
    texts, size = [], 0
    for path in files:
        text = path.read_bytes().decode("utf-8", "replace").replace(EOS, "")
        if max_bytes:
            data = text.encode()[:max_bytes - size]
            text = data.decode("utf-8", "ignore")  # a character cut in two is dropped
            size += len(data)
        texts.append(text)
        if max_bytes and size >= max_bytes:
            break
    return texts


def _digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()


def corpus_id(patterns: Sequence[str], max_bytes: int = 0) -> str:
    """The SHA-256 of the corpus text for ``patterns`` (reads the files, builds nothing)."""
    return _digest(read_text(resolve(patterns), max_bytes))


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer of at most ``vocab_size`` tokens (id 0: :data:`EOS`) trained
    on ``texts``; every string round-trips through ``encode`` / ``decode``."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _val_cut(texts: Sequence[str]) -> list[str]:
    """The first 95% of the text (by characters): the tokenizer never sees the validation end."""
    total = sum(len(t) for t in texts)
    keep, out = int(total * (1 - lm_data.VAL_FRACTION)), []
    for t in texts:
        out.append(t[:keep])
        keep -= len(out[-1])
        if keep <= 0:
            break
    return out


def build(patterns: Sequence[str], vocab_size: int, corpora_dir: str | os.PathLike, *,
          max_bytes: int = 0) -> pathlib.Path:
    """Builds (once) the corpus of ``patterns``: tokenizer, ``uint16`` ids and sidecar, in a folder
    named after the text's SHA-256 and ``vocab_size``; returns the folder."""
    files = resolve(patterns)
    texts = read_text(files, max_bytes)
    digest = _digest(texts)
    folder = pathlib.Path(corpora_dir).expanduser() / f"text_{digest[:12]}_v{vocab_size}"
    if (folder / "tokens.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(_val_cut(texts), vocab_size)
    eos = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    tokens = np.asarray(ids, np.uint16)
    tok.save(str(folder / "tokenizer.json"))
    tmp = folder / "tokens.u16.tmp"
    tokens.tofile(tmp)
    os.replace(tmp, folder / "tokens.u16")
    meta = {"source": "text files", "patterns": list(patterns) or list(DEFAULT_FILES),
            "files": [str(f) for f in files[:len(texts)]], "bytes": sum(len(t.encode())
                                                                        for t in texts),
            "tokens": int(tokens.size), "text_sha256": digest,
            "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
            "vocab_size": vocab_size, "tokenizer_vocab": tok.get_vocab_size(),
            "val_fraction": lm_data.VAL_FRACTION}
    tmp = folder / "tokens.json.tmp"  # the sidecar last: its presence means a complete corpus
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, folder / "tokens.json")
    return folder


def load(patterns: Sequence[str], vocab_size: int, corpora_dir: str | os.PathLike, *,
         max_bytes: int = 0, min_split: int = 2) -> tuple[np.memmap, dict, tokenizers.Tokenizer]:
    """``(ids, meta, tokenizer)``: the corpus's ids as a read-only ``uint16`` memory map (built
    first if absent), its sidecar and its tokenizer. Both splits must hold ``min_split`` ids (a
    ``ValueError`` saying how much text there is otherwise)."""
    folder = build(patterns, vocab_size, corpora_dir, max_bytes=max_bytes)
    meta = json.loads((folder / "tokens.json").read_text())
    ids = np.memmap(folder / "tokens.u16", dtype=np.uint16, mode="r")
    if ids.shape[0] != meta["tokens"]:
        raise ValueError(f"Corpus {folder}/tokens.u16 holds {ids.shape[0]} tokens, its sidecar "
                         f"says {meta['tokens']}: delete the folder to rebuild it.")
    if min(lm_data.split_sizes(ids.shape[0])) < min_split:
        raise ValueError(f"The text corpus ({meta['bytes']} bytes of {len(meta['files'])} files) "
                         f"is {ids.shape[0]} tokens: too few for windows of {min_split} in both "
                         f"splits (the last {lm_data.VAL_FRACTION:.0%} is validation); give more "
                         "text (text_files) or shorter windows (seq_len).")
    return ids, meta, tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
