"""The ``+vpd`` modifiers (spdjax/config/vpd.py): they validate, carry the VPD library's values,
and train end to end with the evaluation suite."""

import json

import numpy as np
import pytest

from spdjax.config import files as configs
from spdjax.config.runs import train_and_evaluate, validate


@pytest.mark.parametrize("name", ["tms:5-2+vpd", "tms:5-2-id+vpd", "tms:40-10+vpd",
                                  "resid_mlp:1+vpd", "resid_mlp:2+vpd", "lm:ih+vpd",
                                  "lm:bytes+vpd"])
def test_every_vpd_config_validates_with_the_whole_recipe(name):
    c = configs.load(name)
    validate(c)
    assert c.microbatches == 1 and c.eval_suite and c.tie_sites is False
    assert c.grad_clip_norm_components == c.grad_clip_norm_ci == 1.0
    assert (c.lr_schedule, c.lr_final_frac) == ("cosine_half", 0.1)
    merged = c.losses.stochastic_pgd_recon_subset
    assert merged.n_warmup_steps == 2 and merged.router == "uniform_k"
    assert dict(merged.optimizer_options) == {"b1": 0.01, "b2": 0.99, "eps": 1e-8}
    imp = c.losses.smooth_l0_importance_minimality
    assert (imp.gamma, imp.gamma_anneal_start_frac, imp.gamma_anneal_final_gamma) == (1.0, 0.0,
                                                                                      0.01)


def test_vpd_values_follow_the_library_configs():
    tms = configs.load("tms:5-2+vpd")  # param-decomp tms_5-2.yaml
    assert (tms.steps, tms.batch_size, tms.lr, tms.ci_fn, tuple(tms.ci_hidden)) == (
        20_000, 4096, 1e-3, "shared_mlp", (50,))
    assert tms.losses.smooth_l0_importance_minimality.coeff == 8e-4
    assert tms.losses.nested_frequency_minimality.coeff == 4e-4
    assert tms.losses.nested_frequency_minimality.reference_datapoint_count == 32768
    assert tms.losses.stochastic_pgd_recon_subset.adv_fraction == 0.5
    assert tuple(tms.losses.stochastic_pgd_recon_subset.batch_shape) == (4096,)
    resid = configs.load("resid_mlp:1+vpd")  # resid_mlp_1l.yaml
    assert (resid.C, resid.steps, resid.batch_size, resid.lr) == (200, 50_000, 2048, 2e-3)
    assert resid.losses.smooth_l0_importance_minimality.coeff == 1e-6
    lm = configs.load("lm:bytes+vpd")  # pile_llama_simple_mlp-4L.yaml, scaled down
    assert lm.ci_fn == "global_transformer" and lm.ci_options.causal
    assert lm.optimizer.components.name == lm.optimizer.ci.name == "muon"
    assert dict(lm.losses.delta_l2) == {"coeff": 1000.0, "normalization": "relative"}
    assert "faithfulness" not in lm.losses
    assert lm.losses.stochastic_pgd_recon_subset.pool_size == 4 * lm.batch_size
    assert lm.losses.nested_frequency_minimality_ema.ema_halflife_steps == 200
    assert set(lm.losses.nonlinearity_locality.units) == {
        f"blocks_{i}/{s}" for i in (0, 1)
        for s in ("mlp_in", "mlp_out", "attn/q", "attn/k", "attn/v", "attn/out")}
    assert "nonlinearity_locality" not in configs.load("lm:ih+vpd").losses  # 1 head, no MLP


def test_ih_circuit_is_the_recipe_measured_in_results():
    """``ih+circuit`` is exactly ``ih+vpd`` with the overrides of RESULTS.md's passing rows."""
    circuit = configs.load("lm:ih+circuit")
    validate(circuit)
    measured = configs.load("lm:ih+vpd", configs.parse_assignments([
        "lr=0.0014", "losses.stochastic_pgd_recon_subset.divergence=kl_answer",
        "losses.smooth_l0_importance_minimality.coeff=0.01275", "losses.delta_l2.coeff=1.0",
        "steps=2000", "init=svd", "losses.smooth_l0_importance_minimality.answer_weight=64"]))
    assert configs.to_dict(circuit) == configs.to_dict(measured)
    assert configs.to_dict(circuit) != configs.to_dict(configs.load("lm:ih+vpd"))
    with pytest.raises(ValueError, match=r"\+circuit is for the induction toy"):
        configs.load("lm:bytes+circuit")


def test_vpd_is_a_whole_recipe_and_its_sources_follow_the_batch():
    with pytest.raises(ValueError, match=r"\+vpd is a whole recipe"):
        configs.load("tms:5-2+vpd+head")
    with pytest.raises(ValueError, match=r"at most 1"):
        configs.load("resid_mlp:1+vpd+head")
    with pytest.raises(ValueError, match=r"batch_shape \(4096,\) starts with 4096 examples but "
                                         r"batch_size is 1024"):
        validate(configs.load("tms:5-2+vpd", {"batch_size": 1024}))
    c = configs.load("tms:5-2", {"microbatches": 2})
    with c.unlocked():
        c.losses.persistent_pgd_recon = {"coeff": 1.0}
    with pytest.raises(ValueError, match=r"\['persistent_pgd_recon'\] keep state across steps"):
        validate(c)


def test_tms_vpd_trains_untied_and_reports_the_suite(tmp_path):
    # a few steps on small batches: what is checked is that every piece runs and reports
    c = configs.load("tms:5-2+vpd", {
        "steps": 4, "batch_size": 32, "eval_batch_size": 64, "log_every": 2,
        "checkpoint_every": 4, "faithfulness_warmup_steps": 2, "eval_pgd_ladder": (2,),
        "figures": False})
    with c.unlocked():
        c.losses.stochastic_pgd_recon_subset.batch_shape = (32,)
    summary = train_and_evaluate(c, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    suite = saved["suite"]
    assert set(suite["l0"]) == {"linear1", "linear2"}  # untied: two sites with their own C
    assert all(np.isfinite(v) for v in suite["loss"].values()) and list(suite["pgd"]) == ["2"]
    assert summary["steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert {"loss/stochastic_pgd_recon_subset", "loss/smooth_l0_importance_minimality",
            "loss/nested_frequency_minimality"} <= set(rows[-1])


@pytest.mark.slow  # ~2 min: every piece of it is tested apart in the default suite
@pytest.mark.parametrize("variant", ["ih", "bytes"])
def test_lm_vpd_trains_with_the_transformer_ci_and_muon(variant, tmp_path, monkeypatch):
    monkeypatch.setenv("SPDJAX_CACHE", str(tmp_path / "cache"))
    c = configs.load(f"lm:{variant}+vpd", {
        "steps": 10, "target_steps": 30, "log_every": 5, "checkpoint_every": 10, "C": 8,
        "batch_size": 8, "eval_batch_size": 8, "eval_pgd_ladder": (2,), "figures": False})
    with c.unlocked():
        c.ci_options.update(d_model=16, layers=1, heads=2, ff=32)
        if variant == "bytes":  # a narrow model on a small corpus: the same code, faster
            c.target_recipe.update(corpus_bytes=100_000, d_model=16, n_heads=2, d_mlp=24,
                                   seq_len=32)
            for site, unit in c.losses.nonlinearity_locality.units.items():
                if not isinstance(unit, str):  # the narrow model's 2 heads
                    c.losses.nonlinearity_locality.units[site] = {**unit, "heads": 2}
    summary = train_and_evaluate(c, tmp_path / "run")
    assert summary["suite"]["divergence"] == "kl"
    assert np.isfinite(summary["kl_ci_masked"]) and np.isfinite(summary["suite"]["pgd"]["2"])
