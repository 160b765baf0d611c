"""Smoke tests of the benchmark scripts that are not exercised elsewhere (a few steps each)."""

import json
import re
import shutil

import numpy as np

import pytest

from benchmarks.reproduce import tms_seed_probe, tms_table1
import spdjax
from spdjax.config import files as configs
from spdjax.config import runs


@pytest.mark.slow  # ~8 s; a benchmark script, not the library
def test_seed_probe_mixes_init_streams_and_reports():
    config = configs.load("tms:5-2")
    run = spdjax.setup(config)
    out = tms_seed_probe.probe(run, 2, 0, 1, steps=20)
    assert (out["comp_seed"], out["ci_seed"], out["train_seed"], out["steps"]) == (2, 0, 1, 20)
    assert out["loss_block_steps"] == 2 and len(out["loss_blocks"]) == 10
    assert all(np.isfinite(out["loss_blocks"])) and out["loss_blocks"][-1] < out["loss_blocks"][0]
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
    overrides = configs.parse_assignments(["init=gaussian", "faithfulness_warmup_steps=200",
                                           "lr=2e-3"])
    assert overrides == {"init": "gaussian", "faithfulness_warmup_steps": 200, "lr": 2e-3}
    config = configs.apply_overrides(configs.load("tms:5-2"), overrides)
    assert (config.init, config.faithfulness_warmup_steps, config.lr) == ("gaussian", 200, 2e-3)
    with pytest.raises(ValueError, match="'no_such_key'"):
        configs.apply_overrides(config, configs.parse_assignments(["no_such_key=1"]))
    with pytest.raises(ValueError, match="'init'"):
        configs.parse_assignments(["init"])
    # a loss term the config lacks is added whole; a bare value for it is refused by name
    added = configs.apply_overrides(configs.load("tms:5-2"), configs.parse_assignments(
        ['losses.unmasked_recon={"coeff": 0.5}']))
    assert added.losses.unmasked_recon.to_dict() == {"coeff": 0.5}
    runs.validate(added)  # the added term builds
    with pytest.raises(ValueError, match="no_such_term"):  # the loss registry names a bad one
        runs.validate(configs.apply_overrides(configs.load("tms:5-2"),
                                                       {"losses.no_such_term": {"coeff": 1}}))
    with pytest.raises(ValueError, match="'unmasked_recon' is not a term .* JSON object"):
        configs.apply_overrides(configs.load("tms:5-2"), {"losses.unmasked_recon": 0.5})
    # an option a term's entry lacks is added; the loss checks its name and value
    vpd = configs.apply_overrides(configs.load("lm:ih+vpd"), configs.parse_assignments(
        ["losses.smooth_l0_importance_minimality.answer_weight=16"]))
    assert vpd.losses.smooth_l0_importance_minimality.answer_weight == 16
    runs.validate(vpd)
    term = "losses.smooth_l0_importance_minimality"
    with pytest.raises(ValueError, match="no_such_option"):
        runs.validate(configs.apply_overrides(configs.load("lm:ih+vpd"),
                                              {f"{term}.no_such_option": 1}))
    with pytest.raises(ValueError, match="answer_weight"):
        runs.validate(configs.apply_overrides(configs.load("lm:ih+vpd"),
                                              {f"{term}.answer_weight": -1}))


def test_table1_refuses_a_changed_recipe_without_a_tag(capsys):
    with pytest.raises(SystemExit):
        tms_table1.main(["--variants=5-2", "--seeds=0", "--set=init=gaussian"])
    assert "--tag" in capsys.readouterr().err


def test_table1_reuses_recorded_runs_without_training(tmp_path, capsys):
    recipe = {"double_update": True}
    run = {"seed": 3, "overrides": [], "steps": 40000, "mmcs": 0.9999, "ml2r": 1.01,
           "ml2r_std": 0.02, "ci_errors": {"total": 0}, "wall_time_s": 600.0,
           "target_recipe": recipe}
    other = {**run, "seed": 4, "overrides": ["lr=2e-3"]}
    old = {k: v for k, v in run.items() if k != "target_recipe"}  # before spdjax 0.3
    (tmp_path / "t.json").write_text(json.dumps({"5-2": {"runs": [run, other]},
                                                 "5-2-id": {"runs": [old]}}))
    table = json.loads((tmp_path / "t.json").read_text())
    assert tms_table1.recorded_run(table, "5-2", 3, [], None, recipe) == run
    assert tms_table1.recorded_run(table, "5-2", 3, [], 1000, recipe) is None  # other steps
    assert tms_table1.recorded_run(table, "5-2", 4, [], None, recipe) is None  # other overrides
    assert tms_table1.recorded_run(table, "5-2-id", 3, [], None, recipe) is None  # old target
    assert tms_table1.recorded_run(table, "5-2-id", 3, [], None, {"double_update": False}) == old
    tms_table1.main(["--variants=5-2", "--seeds=3", f"--root={tmp_path}",
                     f"--out={tmp_path / 't'}"])
    assert "5-2 seed 3: reusing the run recorded" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["5-2"]["runs"] == [run]
    assert "| TMS 5-2 | 1 | 40000 | 0.9999 ± 0.0000 |" in (tmp_path / "t.md").read_text()
    assert "| 0 | 1 of 1 |" in (tmp_path / "t.md").read_text()  # CI errors, ground truth found


def test_table1_save_keeps_rows_written_meanwhile_by_another_invocation(tmp_path):
    run = {"seed": 0, "overrides": [], "steps": 40000, "mmcs": 0.9999, "ml2r": 1.01,
           "ml2r_std": 0.02, "ci_errors": {"total": 0}, "wall_time_s": 600.0}
    out = tmp_path / "t"
    tms_table1.save(out, {"5-2": [run]})  # invocation A, first seed
    other = json.loads(out.with_suffix(".json").read_text())
    other["40-10"] = tms_table1.tabulate({"40-10": [run]})[0]["40-10"]  # B finishes meanwhile
    out.with_suffix(".json").write_text(json.dumps(other))
    tms_table1.save(out, {"5-2": [run, {**run, "seed": 1}]})  # A, second seed
    table = json.loads(out.with_suffix(".json").read_text())
    assert (sorted(table), table["5-2"]["seeds"]) == (["40-10", "5-2"], [0, 1])
    assert "| TMS 40-10 | 1 |" in out.with_suffix(".md").read_text()
    # C trains seed 3 of the same row at the same time: neither loses the other's seeds.
    tms_table1.save(out, {"5-2": [{**run, "seed": 3}]})
    tms_table1.save(out, {"5-2": [run, {**run, "seed": 1}, {**run, "seed": 2}]})  # A, third
    assert json.loads(out.with_suffix(".json").read_text())["5-2"]["seeds"] == [0, 1, 2, 3]
    tms_table1.save(out, {"5-2": [{**run, "seed": 4, "steps": 100}]})  # another recipe: alone
    assert json.loads(out.with_suffix(".json").read_text())["5-2"]["seeds"] == [4]


def test_resid_mlp_seed_table_runs_records_and_resumes(tmp_path, monkeypatch):
    from benchmarks.reproduce import resid_mlp_seeds

    trained = []

    def fake_train(config, workdir):  # what train_and_evaluate leaves: a summary.json
        trained.append((config.seed, config.steps, config.batch_size))
        summary = {"steps": config.steps, "wall_time_s": 60.0,
                   "ci_errors": {"per_site": {"layers_0/mlp_in": 3, "layers_0/mlp_out": 0}},
                   "alive": {"layers_0/mlp_in": 100, "layers_0/mlp_out": 50},
                   "contribution_r": {"layers_0": 0.999, "all": 0.999}}
        workdir.mkdir(parents=True)
        (workdir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(resid_mlp_seeds, "train_and_evaluate", fake_train)
    args = ["--variant=1", "--seeds=0,1", "--steps=4", f"--root={tmp_path}",
            f"--out={tmp_path / 's'}", "--set=batch_size=64"]
    resid_mlp_seeds.main(args)
    assert trained == [(0, 4, 64), (1, 4, 64)]
    records = json.loads((tmp_path / "s.json").read_text())["1@4"]
    assert [r["seed"] for r in records] == [0, 1]
    assert records[0]["identity_errors"] == 3 and records[0]["solved"] is False
    resid_mlp_seeds.main(args)  # both finished: read back, not trained again
    assert len(trained) == 2
    assert "| **1@4** | | | | | | | **0 of 2** | |" in (tmp_path / "s.md").read_text()


def test_resid_mlp_verdict_is_the_papers_solution():
    from benchmarks.reproduce.resid_mlp_seeds import verdict

    good = {"ci_errors": {"per_site": {"layers_0/mlp_in": 0, "layers_0/mlp_out": 0}},
            "alive": {"layers_0/mlp_in": 100, "layers_0/mlp_out": 50},
            "contribution_r": {"layers_0": 0.9999, "all": 0.9999}}
    assert verdict(good, 50)["solved"]
    assert not verdict({**good, "alive": {"layers_0/mlp_out": 51}}, 50)["solved"]
    assert not verdict({**good, "contribution_r": {"all": 0.98}}, 50)["solved"]
    # A real run's summary: tests/test_regression.py applies the verdict to its ResidMLP run.


def test_term_cost_loss_sets_are_valid_and_tabulate():
    from benchmarks import term_costs
    from spdjax.losses import terms_from_config

    for imp in term_costs.IMP.values():
        for losses in term_costs.loss_sets(imp).values():
            terms_from_config(losses)
    for name, imp in term_costs.IMP.items():
        for losses, overrides in term_costs.vpd_sets(name, imp).values():
            terms_from_config(losses)
            runs.validate(configs.load(name, overrides))
    ci_rows = term_costs.ci_sets()
    assert {o["ci_fn"] for _, o in ci_rows.values()} >= {"global_transformer",
                                                          "chunkwise_transformer"}
    for losses, overrides in ci_rows.values():
        assert losses is None  # the config's own loss set
        runs.validate(configs.load("lm:ih", overrides))
    rows = [{"config": "tms:5-2", "loss_set": "paper", "s_per_step": 0.010, "flops_per_step": 1e9},
            {"config": "tms:5-2", "loss_set": "pgd", "s_per_step": 0.025, "flops_per_step": 3e9}]
    info = {"device": "cpu", "cpu_count": 2, "jax": "x", "commit": "c", "date": "d"}
    assert "| tms:5-2 | pgd | 25.0 | 2.50 | 3.000 |" in term_costs.to_markdown(rows, info)


def test_apd_cost_grid_is_valid_configs_and_pairs_the_methods():
    from benchmarks import apd_cost
    from spdjax.config.runs import validate

    for name, Cs, batches in apd_cost.GRIDS["full"]:
        for spec in (name, name + "+apd"):
            validate(configs.load(spec, {"C": Cs[-1], "batch_size": batches[-1],
                                                "microbatches": 1}))
    row = {"config": "resid_mlp:1", "C": 100, "batch_size": 256, "flops_per_step": 2e9,
           "xla_temp_mib": 10.0, "peak_rss_mib": 900.0}
    rows = [{**row, "method": "SPD", "s_per_step": 0.02},
            {**row, "config": "resid_mlp:1+apd", "method": "APD", "s_per_step": 0.3,
             "xla_temp_mib": 300.0}]
    info = {"device": "cpu", "cpu_count": 2, "jax": "x", "commit": "c", "date": "d"}
    expected = ("| resid_mlp:1 | 100 | 256 | 20.0 | 300.0 | 15.0x | 2.00 | 2.00 | 10 | 300 "
                "| 900 | 900 |")
    assert expected in apd_cost.to_markdown(rows, info)


def test_apd_vs_spd_draws_one_row_per_run(tmp_path):
    import pathlib

    import spdjax
    from benchmarks.reproduce import apd_vs_spd

    fixture = pathlib.Path(__file__).parent / "fixtures" / "checkpoint_format1"
    run = spdjax.load(fixture)
    path = apd_vs_spd.plot({"SPD": run, "SPD again": run}, tmp_path / "side.png")
    assert path.exists() and path.stat().st_size > 10_000
    # the per-feature view that wider models (40-10) get, drawn here on the 5-2 run
    W = np.asarray(run.target_params["linear1"]["kernel"], np.float64)
    path = apd_vs_spd.plot_features({"SPD": run, "APD": run}, W, tmp_path / "features.png")
    assert path.exists() and path.stat().st_size > 10_000


def test_the_gpu_script_is_valid_bash_and_names_existing_modules():
    import pathlib
    import re
    import subprocess

    script = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    root = script.parents[1]
    for module in re.findall(r"python -m ([\w.]+)", script.read_text()):
        assert (root / (module.replace(".", "/") + ".py")).exists(), module


def test_lm_scaling_grid_is_valid_configs_and_tabulates():
    from benchmarks import lm_scaling
    from spdjax.config import files as configs
    from spdjax.training.family import FAMILIES

    cfgs = set()
    for variant, _, overrides in lm_scaling.GRID:
        config = configs.load(f"lm:{variant}", {"target_steps": 1, **overrides})
        cfgs.add(FAMILIES.get("lm").model_config(config))  # a valid target recipe
    assert len(cfgs) == 8  # 6 ih targets (T 32 / 128, V 512 / 2048 / 4096, default) + 2 bytes
    row = {"config": "lm:ih", "label": "C 64", "batch_size": 64, "s_per_step": 0.01,
           "steps_per_s": 100.0, "compile_s": 3.0, "xla_temp_mib": 12.0, "peak_rss_mib": 900.0}
    info = {"device": "cpu", "cpu_count": 2, "jax": "x", "commit": "c", "date": "d"}
    table = lm_scaling.to_markdown([row, {**row, "loadavg_1min": 3.25}], info)
    assert "| lm:ih | C 64 | 64 | 10.0 | 100.0 | 3.0 | 12.0 | 900 | - |" in table
    assert "| lm:ih | C 64 | 64 | 10.0 | 100.0 | 3.0 | 12.0 | 900 | 3.2 |" in table


@pytest.mark.slow  # ~20 s; a benchmark script, not the library
def test_sensitivity_grid_runs_saves_and_plots(tmp_path, monkeypatch):
    from benchmarks.reproduce import sensitivity

    monkeypatch.setattr(sensitivity, "MULTIPLIERS", (1.0, 2.0))  # 3 short runs, not 5
    out = tmp_path / "sens"
    args = ["--methods=apd", "--seeds=0", "--steps=20", f"--root={tmp_path / 'runs'}",
            f"--out={out}"]
    sensitivity.main(args)
    table = json.loads(out.with_suffix(".json").read_text())
    # Schatten at 1x (the recipe) and 2x; top-k at 2x (its 1x is the recipe row)
    assert sorted((r["parameter"], r["multiplier"]) for r in table.values()) == [
        ("Schatten", 1.0), ("Schatten", 2.0), ("top-k", 2.0)]
    assert all(len(r["runs"]) == 1 and not sensitivity.found(r["runs"][0]) for r in table.values())
    assert out.with_suffix(".png").exists() and "0 of 1" in out.with_suffix(".md").read_text()
    sensitivity.main(args)  # a rerun reuses every recorded run
    assert json.loads(out.with_suffix(".json").read_text()) == table


def test_table1_trains_a_rows_seeds_as_one_ensemble(tmp_path):
    args = ["--variants=5-2", "--seeds=0,1,3", "--steps=2", "--tag=+small",
            "--set=eval_batch_size=128", "--set=batch_size=64", "--set=figures=false",
            f"--root={tmp_path}", f"--out={tmp_path / 't'}"]
    tms_table1.main(args)
    assert (tmp_path / "5-2+small_seeds0-1" / "seed_1" / "summary.json").exists()
    assert (tmp_path / "5-2+small_seed3" / "summary.json").exists()  # a lone seed: a plain run
    runs = json.loads((tmp_path / "t.json").read_text())["5-2+small"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1, 3] and all(r["steps"] == 2 for r in runs)
    assert tms_table1.consecutive([0, 1, 2, 5, 6, 9]) == [[0, 1, 2], [5, 6], [9]]


def test_step_time_rows_carry_their_floor_and_the_reference_anchor(monkeypatch):
    from benchmarks import run as bench

    # The machine's matmul peak and bandwidth measured on small operands (the defaults, a
    # 2048 x 2048 matmul and 256 MiB ten times each, take seconds of CPU)
    peak, bandwidth = bench.matmul_peak_flops, bench.memory_bandwidth
    monkeypatch.setattr(bench, "matmul_peak_flops", lambda: peak(n=256, reps=2))
    monkeypatch.setattr(bench, "memory_bandwidth", lambda: bandwidth(n_bytes=2**20, reps=2))
    row = bench.measure("tms:5-2", 2, {"batch_size": 64})
    assert row["floor_s_per_step"] == row["flops_per_step"] / row["matmul_peak_flops"]
    assert row["all_bytes_from_dram_s"] == row["bytes_per_step"] / row["memory_bandwidth"] > 0
    assert row["reference_s_per_step"] == (0.042, 0.054)
    info = {"device": "cpu", "cpu_count": 2, "platform": "p", "jax": "j", "commit": "c",
            "date": "d"}
    line = bench.to_markdown([row], info).splitlines()[-1]
    assert "| 42-54 |" in line and line.count("|") == 17


def test_profile_groups_ops_by_what_they_compute():
    import jax
    import jax.numpy as jnp

    from benchmarks import profile

    def f(a, b):
        return jax.scipy.special.erf(a @ b) * 2.0 + 1.0, jnp.transpose(a).copy()

    a = jnp.ones((512, 256))
    hlo = jax.jit(f).lower(a, jnp.ones((256, 128))).compile().as_text()
    groups = profile.op_groups(hlo)
    entry = hlo[hlo.index("ENTRY"):]
    # every op of the entry computation, by the group of what it computes (not its operands)
    top = {groups[n][0] for n in re.findall(r"%([\w.\-]+) = \S+ fusion\(", entry)}
    assert top == {"matmul", "transcendental", "data movement"}, top
    erf_op = next(n for n in re.findall(r"%([\w.\-]+) = \S+ fusion\(", entry)
                  if groups[n][0] == "transcendental")
    assert groups[erf_op][1].startswith("f32[512,128]")
    p = {"config": "x", "steps": 2, "op_ms_per_step": 4.0,
         "groups": {"matmul": 3.0, "transcendental": 1.0},
         "ops": [("dot.1", "matmul", "f32[64,16]", 3.0), ("erf_fusion", "transcendental",
                                                          "f32[64,16]", 1.0)]}
    md = profile.to_markdown(p, top=1)
    assert "| matmul | 3.00 | 75% |" in md and "| dot.1 | matmul | `f32[64,16]` | 3.00 |" in md
    assert "erf_fusion" not in md


def test_contribution_norm_ratio_is_residmlps_ml2r():
    """Each (feature, layer) row's norm over the target's; rows with a ~zero target are left out."""
    from benchmarks.reproduce.apd_vs_spd_resid import contribution_norm_ratio

    rng = np.random.default_rng(0)
    t0, t1 = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    t1[2] = 1e-6  # a feature this layer does not compute: no ratio
    scale0, scale1 = np.array([1.0, 0.9, 0.8, 0.7]), np.array([0.5, 1.0, 123.0, 1.0])
    out = contribution_norm_ratio({0: {"target": t0, "spd": -t0 * scale0[:, None]},
                                   1: {"target": t1, "spd": t1 * scale1[:, None]}})
    expected = np.array([1.0, 0.9, 0.8, 0.7, 0.5, 1.0, 1.0])
    assert out["n"] == 7
    np.testing.assert_allclose([out["mean"], out["std"], out["median"]],
                               [expected.mean(), expected.std(), np.median(expected)], rtol=1e-6)


@pytest.mark.slow  # ~50-100 s of compiles (SPD and APD, 2 layers); 1 layer is the same code
def test_apd_vs_spd_resid_tables_and_draws_every_layer(tmp_path, monkeypatch):
    """Both methods on one small 2-layer target: a row per method with per-layer numbers, the
    contributions figure with a strip per layer and method, the scrubbing histogram."""
    from benchmarks.reproduce import apd_vs_spd_resid
    from spdjax.config.runs import train_and_evaluate

    monkeypatch.setenv("SPDJAX_CACHE", str(tmp_path / "cache"))
    small = {"target_recipe.n_features": 12, "target_recipe.d_embed": 24,
             "target_recipe.d_mlp": 6, "target_steps": 20, "steps": 4, "C": 16,
             "batch_size": 32, "eval_batch_size": 256, "log_every": 2, "checkpoint_every": 4,
             "figures": False}
    for name, extra in (("spd", {"microbatches": 1}), ("apd", {"apd.topk": 2.0})):
        config = configs.load(f"resid_mlp:2{'+apd' if name == 'apd' else ''}", {**small, **extra})
        train_and_evaluate(config, tmp_path / name)
    out = tmp_path / "side"
    apd_vs_spd_resid.main([f"--spd={tmp_path / 'spd'}", f"--apd={tmp_path / 'apd'}",
                           f"--out={out}", "--n_examples=64"])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["SPD", "APD"]
    assert all(len(r["contribution_r_per_layer"]) == len(r["distinct_chosen_per_layer"]) == 2
               for r in rows)
    assert all(r["contribution_norm_ratio"]["n"] > 0 for r in rows)
    assert "ci_errors" in rows[0] and set(rows[1]["scrub_mean_mse"]) == {
        "topk", "scrubbed", "anti_scrubbed"}
    md = out.with_suffix(".md").read_text()
    assert "\n| SPD | 4 | 16 | " in md and "\n| APD | 4 | 16 | " in md
    for suffix in ("_contributions.png", "_scrub.png"):
        assert (tmp_path / f"side{suffix}").stat().st_size > 10_000


def test_lm_report_tables_the_maskings_suite_and_most_used_subcomponents(finished_runs,
                                                                          tmp_path, capsys):
    from benchmarks.reproduce import lm_report

    shutil.copytree(finished_runs["lm"], tmp_path / "run")
    masked = {"ce_target": 0.5, "ce_unmasked": 0.6, "kl_unmasked": 0.1, "ce_zero": 4.5,
              "kl_zero": 9.0, "ce_ci_masked": 1.0, "kl_ci_masked": 0.4,
              "ce_recovered": {"unmasked": 0.975, "ci_masked": 0.875}, "steps": 2}
    suite = json.loads((finished_runs["tms_vpd"] / "summary.json").read_text())["suite"]
    capsys.readouterr()  # the fixture's runs' progress
    (tmp_path / "run" / "summary.json").write_text(json.dumps(dict(masked, suite=suite)))
    lm_report.main([f"--workdir={tmp_path / 'run'}", "--name=tiny", f"--out={tmp_path}"])
    text = (tmp_path / "tiny_report.md").read_text()
    assert text == capsys.readouterr().out
    assert "| target | 0.5000 | 0 | 100% |" in text
    # VPD's order, least ablated first; a masking without a CE-recovered value leaves it blank
    assert text.index("| unmasked | 0.6000 | 0.1000 | 97.5% |") < text.index(
        "| ci_masked | 1.0000 | 0.4000 | 87.5% |") < text.index("| zero | 4.5000 | 9.0000 |  |")
    ladder = sorted(suite["pgd"], key=int)
    assert f"| PGD steps (sources shared across the batch) | {' | '.join(ladder)} |" in text
    for site, l0 in suite["l0"].items():
        assert f"| {site} | {l0:.2f} | {suite['alive_mean_ci'][site]} |" in text
    # the harvest's most used subcomponents of each layer, with contexts around the token
    assert text.count("**blocks_0**") == text.count("**blocks_1**") == 1 and "[[" in text
    assert json.loads((tmp_path / "tiny_summary.json").read_text())["ce_target"] == 0.5
    with pytest.raises(SystemExit):  # an unfinished run is refused by name
        lm_report.main([f"--workdir={tmp_path / 'nothing'}", "--name=x", f"--out={tmp_path}"])
    assert "has no summary.json" in capsys.readouterr().err


def test_induction_seeds_table_counts_passes_and_shows_the_worst_site(tmp_path):
    from benchmarks.reproduce import induction_seeds
    from spdjax.families.lm import induction

    sites = list(induction.CIRCUIT_POSITION)
    per_site = {n: 1.0 for n in sites}
    m = {"sparsity": {"at_induction": per_site, "elsewhere": per_site}, "found": {n: 3
                                                                                  for n in sites},
         "kept_accuracy": 0.6, "ablated_accuracy": 0.01, "previous_token_mass": 0.3,
         "target_previous_token_mass": 0.38, "induction_mass": 0.9, "target_induction_mass": 1.0,
         "ov_diagonal_fraction": 0.98, "passes": {k: True for k in induction_seeds.SHORT},
         "all_pass": True}
    old = {"seed": 0, "steps": 10, "overrides": [], "wall_time_s": 60.0, "induction": m}
    new = dict(old, seed=1, induction=dict(
        m, all_pass=False, unmasked_accuracy=1.0, kept_ci_masked_accuracy=0.995,
        saturated_at_induction={n: 0.5 for n in sites},
        kept_accuracy_one_site={**{n: 1.0 for n in sites}, "blocks_0/attn/k": 0.982}))
    out = tmp_path / "t"
    induction_seeds.save(out, "ih@10", old)
    induction_seeds.save(out, "ih@10", new)
    induction_seeds.save(out, "ih@10", dict(new, wall_time_s=120.0))  # a rerun replaces its seed
    text = out.with_suffix(".md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ih@10 |")]
    assert len(rows) == 2 and "| — | — | — |" in rows[0]
    assert "| 0.982 (L0 k) | 1.000 | 0.995 |" in rows[1] and "| 2.0 |" in rows[1]
    assert "**1 of 2**" in text
    assert "| 1.0/1.0/1.0/1.0/1.0/1.0/1.0/1.0 | — |" in rows[0]  # judged before the column
    assert "| 1.0/1.0/1.0/1.0/1.0/1.0/1.0/1.0 | 0.5/0.5/0.5/0.5/0.5/0.5/0.5/0.5 |" in rows[1]
    header = next(line for line in text.splitlines() if line.startswith("| row |"))
    assert all(line.count("|") == header.count("|") for line in rows)


def test_induction_ov_rank_counts_the_fewest_singular_pieces():
    import jax
    import jax.numpy as jnp

    from benchmarks.reproduce import induction_ov_rank as ov
    from spdjax.families.lm import induction
    from spdjax.families.lm import model as lm_model

    cfg = lm_model.LMConfig("induction", 12, 16, 8, 1, 2, prefix_window=10)
    params = lm_model.init_params(jax.random.key(0), cfg)
    ids, _ = lm_model.induction(cfg, jax.random.key(1), 16)
    labels = np.asarray(jnp.argmax(induction.forward(params, cfg, ids)[0][:, -1], -1))
    n = ov.pieces_needed(params, cfg, ids, labels, kl_max=0.05)
    # independently, per sequence: the pieces by effect, the smallest k that works, k - 1 not
    rest, a = (np.asarray(t, np.float64) for t in ov.head_inputs(params, cfg, ids))
    w_out = np.asarray(params["blocks_1"]["attn"]["out"]["kernel"], np.float64)
    w_u = np.asarray(params["unembed"]["kernel"], np.float64)
    p, s, qt = np.linalg.svd(w_out)
    for b in range(16):
        parts = [s[j] * (a[b] @ p[:, j]) * qt[j] for j in range(len(s))]
        parts.sort(key=lambda v: -np.linalg.norm(v @ w_u))
        logits = [(rest[b] + sum(parts[:k], np.zeros(cfg.d_model))) @ w_u
                  for k in range(len(s) + 1)]
        lp = [lg - np.logaddexp.reduce(lg) for lg in logits]
        kl = [float(np.sum(np.exp(lp[-1]) * (lp[-1] - x))) for x in lp]
        assert n["answer"][b] == min(k for k, lg in enumerate(logits) if lg.argmax() == labels[b])
        assert n["kl"][b] == min(k for k, v in enumerate(kl) if v < 0.05)
    np.testing.assert_allclose(n["singular_values"], s)


def test_induction_ov_rank_keeps_the_costliest_pieces():
    from benchmarks.reproduce import induction_ov_rank as ov

    rng = np.random.default_rng(0)
    pieces, rest, costs = rng.normal(size=(5, 6, 9)), rng.normal(size=(5, 9)), rng.random((5, 6))
    ref = rng.normal(size=(5, 9))
    got = ov.kl_keeping_top(pieces, rest + pieces.sum(1), costs, (0, 2, 6), reference_logits=ref)
    for k in (0, 2, 6):  # by hand: per sequence the k costliest pieces on top of the rest
        kls = []
        for b in range(5):
            keep = sorted(range(6), key=lambda j: -costs[b, j])[:k]
            lq = rest[b] + sum((pieces[b, j] for j in keep), np.zeros(9))
            lp, lq = ref[b] - np.logaddexp.reduce(ref[b]), lq - np.logaddexp.reduce(lq)
            kls.append(np.sum(np.exp(lp) * (lp - lq)))
        assert got[k] == pytest.approx(np.mean(kls), abs=1e-5)
    assert ov.kl_keeping_top(pieces, rest + pieces.sum(1), costs, (6,))[6] == pytest.approx(0.0,
                                                                                          abs=1e-6)


def test_compile_share_sums_the_compile_events_of_each_process(tmp_path):
    import jax
    import jax.numpy as jnp

    from benchmarks import compile_share

    totals = compile_share.Totals()
    jax.monitoring.register_event_duration_secs_listener(totals.listener)
    try:
        jax.jit(lambda x: jnp.sin(x) * 3.0 + x.sum())(jnp.arange(7.0)).block_until_ready()
    finally:
        jax.monitoring.unregister_event_duration_listener(totals.listener)
    assert totals.seconds["backend compile"] > 0 and totals.seconds["tracing"] > 0
    totals.write(tmp_path)
    (tmp_path / "compile_1.json").write_text(json.dumps({"process_cpu_s": 2.0, "tracing": 1.0}))
    out = compile_share.summarize(tmp_path)
    assert out["processes"] == 2
    assert out["tracing"] == round(1.0 + totals.seconds["tracing"], 1)
    with pytest.raises(SystemExit, match="No compile_"):
        compile_share.summarize(tmp_path / "empty")


def test_cluster_ground_truth_counts_lone_mlp_in_and_the_mlp_out_block():
    from benchmarks.reproduce import cluster_resid_mlp as cr

    # 4 features: mlp_in subcomponents 0..3 (features 2 and 3 share a cluster), live mlp_out
    # 10..13 (three of four in cluster 9), each feature's mlp_out 10 + f
    labels = np.array([0, 1, 2, 2, -1, -1, -1, -1, -1, -1, 9, 9, 9, 5])
    f_in, live_out = np.array([0, 1, 2, 3]), np.array([10, 11, 12, 13])
    k = cr.known_structure(labels, f_in, live_out)
    assert k == {"in_alone": 0.5, "out_block": 0.75, "live_out": 4}
    # two features sharing one mlp_in subcomponent are not "another feature's" subcomponent
    assert cr.known_structure(labels, np.array([0, 0, 1]), live_out)["in_alone"] == 1.0
    s = cr.same_cluster(np.array([0, 1, 2, 3, 0, 1, 0, 7]), f_in, np.arange(4, 8))
    assert s["same"] == 0.5 and s["chance"] == pytest.approx(1 / 12)
