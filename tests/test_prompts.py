"""spdjax/cli/prompts.py for a text (Llama) LM: a text prompt is encoded by the run's corpus
tokenizer (the one the viewer decodes with), a prompt of integers is read as ids, and a corpus
that cannot be read leaves ids with a message saying why."""

import dataclasses
import types

import pytest

from spdjax.cli import prompts
from spdjax.families.lm import harvest_page, model as lm_model


def _run(cfg):
    """What ``prompts.codec`` reads of a loaded run."""
    family = types.SimpleNamespace(name="lm")
    return types.SimpleNamespace(experiment=types.SimpleNamespace(model_config=cfg,
                                                                  family=family))


@pytest.fixture(scope="module")
def text_cfg(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("text") / "corpus.txt"
    corpus.write_text("the cat sat on the mat; the dog sat on the log. " * 400)
    return dataclasses.replace(lm_model.VARIANTS["llama_2x128"], text_files=(str(corpus),),
                               vocab_size=300, seq_len=8)


def test_a_text_prompt_is_encoded_by_the_runs_tokenizer(text_cfg):
    run = _run(text_cfg)
    tok = lm_model.text_corpus(text_cfg)[2]
    batch, codec = prompts.prompt_batch(run, "the cat sat")
    assert batch.dtype.kind == "i" and batch.shape == (1, len(tok.encode("the cat sat").ids))
    assert batch[0].tolist() == tok.encode("the cat sat").ids
    decode = harvest_page.decoder(text_cfg)  # the viewer's and the harvest page's decoder
    assert "".join(codec.decode(i) for i in batch[0]) == decode(batch[0]) == "the cat sat"
    ids, _ = prompts.prompt_batch(run, "5 17 42")  # integers only: ids, as before
    assert ids.tolist() == [[5, 17, 42]]
    with pytest.raises(ValueError, match=r"Token ids \[300\] are outside the vocabulary "
                                         r"\[0, 300\)"):
        prompts.prompt_batch(run, "5 300")
    with pytest.raises(ValueError, match="the model's context is 8 positions"):
        prompts.prompt_batch(run, "the cat sat on the mat; the dog sat on the log.")


def test_an_unreadable_corpus_leaves_ids_and_says_why(text_cfg, tmp_path):
    cfg = dataclasses.replace(text_cfg, text_files=(str(tmp_path / "gone*.txt"),))
    run = _run(cfg)
    assert prompts.prompt_batch(run, "1 2 3")[0].tolist() == [[1, 2, 3]]
    assert prompts.codec(run).decode is None
    with pytest.raises(ValueError, match=r"is text, and this run's tokenizer cannot be read "
                                         r"\(ValueError: text_files pattern"):
        prompts.prompt_batch(run, "the cat")
