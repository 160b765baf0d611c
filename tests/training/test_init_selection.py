"""Best-of-K init selection: the choice, its errors, and that the kept run is the plain run."""

import io
import json

import jax
import numpy as np
import pytest

import spdjax
from spdjax.config import files as configs
from spdjax.training import init_selection, loop
from spdjax.training.progress import log_to


def tms_config(**overrides):
    return configs.load("tms:5-2", {"steps": 24, "batch_size": 64, "eval_batch_size": 512,
                                    "log_every": 4, "checkpoint_every": 12, "figures": False,
                                    **overrides})


def train_and_evaluate(config, workdir, out=None):
    """``loop.train_and_evaluate`` with the ``"spdjax"`` log captured in ``out``."""
    with log_to(out if out is not None else io.StringIO()):
        return spdjax.train_and_evaluate(config, workdir)


def test_select_keeps_the_lowest_loss_and_records_all():
    losses = [3.0, 1.0, 2.0]
    probed = []

    def probe(i):
        probed.append(i)
        return init_selection.Probe(i, losses[i], state=f"state{i}", lines=[(4, {"x": i})])

    best, record = init_selection.select(3, probe, report=lambda _: None)
    assert probed == [0, 1, 2] and best.index == 1 and best.state == "state1"
    assert record == {"chosen": 1, "losses": losses}


def test_candidate_zero_is_the_runs_own_init_key():
    key = jax.random.key(3)
    assert init_selection.candidate_key(key, 0) is key
    k1, k2 = (jax.random.key_data(init_selection.candidate_key(key, i)) for i in (1, 2))
    assert not np.array_equal(k1, k2)


@pytest.mark.parametrize("overrides, match", [
    ({"init_candidates": 0}, "init_candidates must be an integer >= 1, got 0"),
    ({"init_candidates": 2, "init_select_steps": 0},
     r"init_select_steps=0 must be .* \[4, steps=24\)"),
    ({"init_candidates": 2, "init_select_steps": 24}, "init_select_steps=24 must be"),
])
def test_bad_selection_settings_fail_early(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train_and_evaluate(tms_config(**overrides), tmp_path)


@pytest.mark.slow  # ~15 s; the selection itself is tested above
def test_selected_run_equals_the_plain_run_of_its_init(tmp_path, monkeypatch):
    out = io.StringIO()
    selected = train_and_evaluate(
        tms_config(init_candidates=3, init_select_steps=8), tmp_path / "sel", out)
    record = selected["init_selection"]
    assert record["chosen"] == int(np.argmin(record["losses"])) and record["steps"] == 8
    assert "init candidate 3/3: step 8/8" in out.getvalue()
    assert "Continuing init candidate" in out.getvalue()
    lines = [json.loads(l) for l in (tmp_path / "sel" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [4, 8, 12, 16, 20, 24]
    assert not (tmp_path / "sel" / "figures").exists()  # config.figures=False: none drawn

    # The plain run (no selection) from the chosen candidate's init key gives the same result.
    from_seed = loop.RunKeys.from_seed

    def chosen_keys(seed):
        keys = from_seed(seed)
        return loop.RunKeys(init_selection.candidate_key(keys.init, record["chosen"]),
                            keys.train, keys.eval)

    monkeypatch.setattr(loop.RunKeys, "from_seed", staticmethod(chosen_keys))
    plain = train_and_evaluate(tms_config(), tmp_path / "plain")
    assert "init_selection" not in plain
    for key in ("mmcs", "ml2r"):
        np.testing.assert_allclose(selected[key], plain[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(selected["loss"]["total"], plain["loss"]["total"], rtol=1e-5,
                               err_msg="loss/total")

    # Rerunning the finished workdir resumes (nothing left to train) and keeps the record.
    monkeypatch.undo()
    again = train_and_evaluate(tms_config(init_candidates=3, init_select_steps=8), tmp_path / "sel")
    assert again["init_selection"] == record
    np.testing.assert_allclose(again["loss"]["total"], selected["loss"]["total"], rtol=1e-6)
