"""Seed ensembles in one program (--config.ensemble=N): each member is its seed's run alone."""

import io
import json

import jax
import numpy as np
import pytest

import spdjax
from helpers import shared_train_steps
from spdjax.config import files as configs
from spdjax.training import ensemble
from spdjax.training.progress import log_to
from spdjax.training.workdir import config_dict


def tms_config(**overrides):
    return configs.load("tms:5-2", {"steps": 10, "batch_size": 64, "eval_batch_size": 128,
                                    "log_every": 5, "checkpoint_every": 5, "figures": False,
                                    **overrides})


def _config_but_seed_and_coefficients(config) -> str:
    fields = config_dict(config)
    del fields["seed"]
    for options in fields["losses"].values():
        options.pop("coeff", None)
    return json.dumps(fields, sort_keys=True)


@pytest.fixture(scope="module", autouse=True)
def one_step_per_config():
    """Single runs whose configs differ only in their seed or loss coefficients share one
    compiled train step (helpers.py): the step takes the seed's keys and state and the
    coefficients as arguments, so sharing it changes no number."""
    with shared_train_steps(_config_but_seed_and_coefficients):
        yield


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


TIMING = ("steps_per_sec", "wall_time_s")


@pytest.mark.parametrize("mode, steps_per_call", [
    ("vmap", 1), pytest.param("map", 5, marks=pytest.mark.slow)])  # map: ~45 s, the same check
def test_each_member_equals_its_seed_run_alone(tmp_path, mode, steps_per_call):
    with log_to(io.StringIO()):
        summaries = spdjax.train_and_evaluate(
            tms_config(ensemble=2, seed=4, ensemble_mode=mode, steps_per_call=steps_per_call),
            tmp_path / "ens")
        alone = [spdjax.train_and_evaluate(tms_config(seed=s), tmp_path / f"alone{s}")
                 for s in (4, 5)]
    assert [s["steps"] for s in summaries] == [10, 10]
    for seed, ens_summary, single in zip((4, 5), summaries, alone):
        member = tmp_path / "ens" / f"seed_{seed}"
        for a, b in zip(rows(member / "metrics.jsonl"), rows(tmp_path / f"alone{seed}" /
                                                             "metrics.jsonl")):
            assert a["step"] == b["step"]
            for k in b:
                if k not in TIMING:
                    np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(ens_summary["mmcs"], single["mmcs"], rtol=1e-4)
        np.testing.assert_allclose(ens_summary["loss"]["total"], single["loss"]["total"],
                                   rtol=1e-3)
        assert json.loads((member / "summary.json").read_text())["steps"] == 10
    table = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert table["seeds"] == [4, 5] and set(table["members"]) == {"seed_4", "seed_5"}
    # members differ from each other: different inits and data
    assert summaries[0]["loss"]["total"] != summaries[1]["loss"]["total"]


# ~20 s; each member equals its own run (above), and runs resume in test_faults.py
@pytest.mark.slow
def test_a_stopped_ensemble_resumes_to_the_same_result(tmp_path):
    config = tms_config(ensemble=2)
    with log_to(io.StringIO()):
        ens = spdjax.setup_ensemble(config, tmp_path / "a")
        ensemble.train(ens, until_step=5)  # stops after the step-5 checkpoint
        ensemble.close(ens)
        ens = spdjax.setup_ensemble(config, tmp_path / "a")
        assert ens.step == 5
        ensemble.train(ens)
        resumed = jax.device_get(ens.state.params)
        ensemble.close(ens)
        straight = spdjax.setup_ensemble(config, tmp_path / "b")
        ensemble.train(straight)
        ensemble.close(straight)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), resumed,
                 jax.device_get(straight.state.params))
    assert [r["step"] for r in rows(tmp_path / "a" / "seed_0" / "metrics.jsonl")] == [5, 10]
    # spdjax.load reads one member as the run it equals
    member = spdjax.load(tmp_path / "b", member="seed_1")
    assert member.config.seed == 1 and member.step == 10
    assert member.workdir == tmp_path / "b" / "seed_1"
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[1]), member.params,
                 jax.device_get(straight.state.params))
    with pytest.raises(ValueError, match=r"holds an ensemble of 2 runs: pass member= one of "
                                         r"\['seed_0', 'seed_1'\]"):
        spdjax.load(tmp_path / "b")


@pytest.mark.parametrize("overrides, match", [
    ({"ensemble": 0}, "ensemble must be an integer >= 1, got 0"),
    ({"ensemble": 2, "ensemble_mode": "pmap"},
     "ensemble_mode must be 'auto', 'vmap' or 'map', got 'pmap'"),
    ({"ensemble_sweep": "lr=1e-3,x"}, "ensemble_sweep must be 'dotted.key=v1,v2,...' with numbers"),
    ({"ensemble_sweep": "losses.nope.coeff=1,2"}, "the config has no field 'losses.nope.coeff'"),
    ({"ensemble_sweep": "C=10,20"}, "only float fields"),
    ({"ensemble": 2, "init_candidates": 3, "init_select_steps": 8},
     "init_candidates must be 1, got 3"),
    ({"ensemble": 2, "mesh_model": 2}, "mesh_model must be 1, got 2"),
])
def test_bad_ensemble_settings_fail_early(overrides, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        with log_to(io.StringIO()):
            spdjax.train_and_evaluate(tms_config(**overrides), tmp_path)


def test_a_coefficient_sweep_is_one_program_of_every_value_and_seed(tmp_path):
    key = "losses.importance_minimality.coeff"
    with log_to(io.StringIO()):
        summaries = spdjax.train_and_evaluate(
            tms_config(ensemble=2, ensemble_sweep=f"{key}=1e-3,1e-2"), tmp_path / "sweep")
        alone = spdjax.train_and_evaluate(tms_config(seed=1, **{key: 1e-2}), tmp_path / "alone")
    assert len(summaries) == 4  # (1e-3, seed 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)
    member = tmp_path / "sweep" / f"seed_1_{key}=0.01"
    for a, b in zip(rows(member / "metrics.jsonl"), rows(tmp_path / "alone" / "metrics.jsonl")):
        for k in b:
            if k not in TIMING:
                np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-7, err_msg=k)
    np.testing.assert_allclose(summaries[3]["loss"]["total"], alone["loss"]["total"], rtol=1e-3)
    table = json.loads((tmp_path / "sweep" / "ensemble.json").read_text())
    assert table["sweep"] == key and table["members"][f"seed_0_{key}=0.001"][key] == 1e-3


def test_coefficients_are_traced_so_a_sweep_shares_one_step_and_other_fields_do_not():
    """Loss coefficients enter the step as inputs (Method.hparams): every (value, seed) member of
    a coefficient sweep goes through one traced step; an lr sweep needs a step per value."""
    key = "losses.importance_minimality.coeff"
    with log_to(io.StringIO()):
        ens = spdjax.setup_ensemble(tms_config(ensemble=2, ensemble_sweep=f"{key}=1e-3,1e-2,3e-2"))
        assert len(ens.members) == 6 and len(ens.groups) == 1
        np.testing.assert_allclose(ens.hparams["importance_minimality"],
                                   [1e-3, 1e-3, 1e-2, 1e-2, 3e-2, 3e-2], rtol=1e-6)
        lr = spdjax.setup_ensemble(tms_config(ensemble_sweep="lr=1e-3,2e-3"))
        assert [(a, b) for _, a, b in lr.groups] == [(0, 1), (1, 2)]
