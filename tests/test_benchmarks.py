"""Smoke tests of the benchmark scripts that are not exercised elsewhere (a few steps each)."""

import json

import pytest

from benchmarks import tms_seed_probe, tms_table1
from benchmarks.tms_table1 import apply_overrides, load_config
from spdjax.experiment import build_experiment


def test_seed_probe_mixes_init_streams_and_reports():
    config = load_config("5-2")
    exp = build_experiment(config)
    out = tms_seed_probe.probe(config, exp, 2, 0, 1, steps=3)
    assert (out["comp_seed"], out["ci_seed"], out["train_seed"], out["steps"]) == (2, 0, 1, 3)
    assert set(out["distinct_carriers"]) == {"linear1", "linear2"}
    assert all(1 <= n <= 5 for n in out["distinct_carriers"].values())
    assert 0.0 < out["mmcs"] <= 1.0 and 0 <= out["norm_above_0.1"] <= config.C
    json.dumps(out)  # what main() writes must be JSON


@pytest.mark.parametrize("bad", ["1:2:3:4", "1", "a:b"])
def test_seed_probe_rejects_a_malformed_pair(bad):
    with pytest.raises(ValueError, match=bad):
        tms_seed_probe.main([f"--pairs=0:0,{bad}", "--probe_steps=1"])


def test_seed_probe_parses_pairs_and_triples():
    assert tms_seed_probe.parse_seeds("2:7") == (2, 2, 7)
    assert tms_seed_probe.parse_seeds("2:0:7") == (2, 0, 7)


def test_overrides_parse_values_and_reject_unknown_keys():
    config = apply_overrides(load_config("5-2"), ["init=gaussian", "faithfulness_warmup_steps=200",
                                                  "lr=2e-3"])
    assert (config.init, config.faithfulness_warmup_steps, config.lr) == ("gaussian", 200, 2e-3)
    with pytest.raises(ValueError, match="'no_such_key=1'"):
        apply_overrides(config, ["no_such_key=1"])
    with pytest.raises(ValueError, match="'init'"):
        apply_overrides(config, ["init"])


def test_table1_refuses_a_changed_recipe_without_a_tag(capsys):
    with pytest.raises(SystemExit):
        tms_table1.main(["--variants=5-2", "--seeds=0", "--set=init=gaussian"])
    assert "--tag" in capsys.readouterr().err
