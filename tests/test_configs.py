"""The TMS config file's variants and ``+modifier`` suffixes (``--config=configs/tms.py:ARG``)."""

import re

import pytest

from spdjax.config import files as configs


def load_config(arg):
    return configs.load(f"tms:{arg}")


def test_gaussian_modifier_switches_to_the_later_init_and_keeps_the_variant():
    paper, later = load_config("5-2-id"), configs.load("tms:5-2-id+gaussian")
    assert (paper.init, paper.faithfulness_warmup_steps) == ("paper", 0)
    assert (later.init, later.faithfulness_warmup_steps) == ("gaussian", 200)
    assert later.variant == "5-2-id"
    assert {k: v for k, v in later.items() if k not in ("init", "faithfulness_warmup_steps")} == {
        k: v for k, v in paper.items() if k not in ("init", "faithfulness_warmup_steps")}


def test_select3_modifier_sets_a_valid_best_of_3_init_and_nothing_else():
    from spdjax.training import init_selection

    plain, sel = load_config("5-2-id"), load_config("5-2-id+select3")
    assert (plain.init_candidates, sel.init_candidates, sel.init_select_steps) == (1, 3, 8000)
    init_selection.check_config(sel)  # 8000 < steps: a usable setting for the full recipe
    changed = ("init_candidates", "init_select_steps")
    assert {k: v for k, v in sel.items() if k not in changed} == {
        k: v for k, v in plain.items() if k not in changed}
    both = load_config("5-2+gaussian+select3")
    assert (both.init, both.init_candidates) == ("gaussian", 3)


@pytest.mark.parametrize("arg, named", [("5-3", "'5-3'"), ("5-2+gausian", "+gausian"),
                                        ("+gaussian", "''"), ("5-2+apd+pgd", "'5-2+apd+pgd'"),
                                        ("5-2+apd+apd_paper", "'5-2+apd+apd_paper'")])
def test_unknown_variant_or_modifier_is_named(arg, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        load_config(arg)


@pytest.mark.parametrize("name, family, variant, modifiers", [
    ("tms", "TMS", "5-2",
     "'+head', '+apd', '+apd_paper', '+gaussian', '+select3', '+pgd', '+vpd'"),
    ("resid_mlp", "ResidMLP", "1", "'+head', '+apd', '+vpd'"),
    ("lm", "LM", "ih", "'+vpd', '+answer', '+answer_ci', '+circuit'"),
])
def test_every_config_file_rejects_an_unknown_variant_or_modifier_alike(name, family, variant,
                                                                        modifiers):
    """One grammar, ``<variant>[+<modifier>]...`` (spdjax.config.parse_variant), one message."""
    expected = re.escape(f"Unknown {family} modifier '+bogus' in '{variant}+bogus'; expected "
                         f"one of [{modifiers}].")
    with pytest.raises(ValueError, match=f"^{expected}$"):
        configs.load(f"{name}:{variant}+bogus")
    with pytest.raises(ValueError, match=rf"^Unknown {family} variant 'bogus' in 'bogus\+head'; "
                                         r"expected one of \["):
        configs.load(f"{name}:bogus+head")


def test_apd_paper_is_the_apd_papers_40_10_settings_and_5_2_the_codes():
    code, paper = load_config("40-10+apd"), load_config("40-10-id+apd_paper")
    assert (code.C, code.apd.topk, code.apd.schatten_coeff) == (40, 2.0, 15.0)
    assert (paper.C, paper.apd.topk, paper.apd.schatten_coeff, paper.apd.init_fans) == (
        50, 1.0, 20.0, "torch")
    same = ("C", "apd")  # everything else as +apd
    assert {k: v for k, v in paper.items() if k not in same} == {
        k: v for k, v in load_config("40-10-id+apd").items() if k not in same}
    assert load_config("5-2+apd_paper").to_dict() == load_config("5-2+apd").to_dict()


def test_the_target_recipe_defaults_to_the_reference_and_the_old_one_is_selectable(tmp_path):
    from spdjax.training.family import FAMILIES
    from spdjax.families.tms import cache as tms_cache
    from spdjax.config.runs import validate

    family = FAMILIES.get("tms")
    default = family.model_config(load_config("5-2"))
    old = family.model_config(configs.load("tms:5-2", {"target_recipe.double_update": False}))
    assert default.double_update and not old.double_update
    assert tms_cache.cache_stem(old, 0, tmp_path).endswith("tms_5-2_single-update_seed0")
    assert tms_cache.cache_stem(default, 0, tmp_path).endswith("tms_5-2_seed0")
    # A record written before the recipe was a config field ran on the old recipe.
    record = configs.to_dict(load_config("5-2"))
    del record["target_recipe"]
    assert configs.from_dict(record).target_recipe.double_update is False
    bad = load_config("5-2")
    with bad.unlocked():
        bad.target_recipe.bogus = 1
    with pytest.raises(ValueError, match=r"target_recipe fields \['bogus'\] are not fields"):
        validate(bad)
    # Any recipe field can be overridden by name (the APD paper's 40-10 target: batch 2048);
    # a name that is not one reaches the same check.
    apd_era = configs.load("tms:40-10", {"target_recipe.batch_size": 2048, "target_steps": 2000})
    cfg = family.model_config(apd_era)
    assert (cfg.batch_size, cfg.steps, cfg.double_update) == (2048, 2000, True)
    # ... and is cached under its own name, not over the variant's target
    stem = tms_cache.cache_stem(cfg, 0, tmp_path)
    assert stem.endswith("tms_40-10_steps2000_batch_size2048_seed0")
    with pytest.raises(ValueError, match=r"target_recipe fields \['bogus'\] are not fields"):
        validate(configs.load("tms:5-2", {"target_recipe.bogus": 1}))


@pytest.mark.parametrize("spec, terms", [
    ("tms:5-2+head", ["importance_minimality", "stochastic_recon", "stochastic_recon_layerwise"]),
    ("tms:40-10-id+head", ["importance_minimality", "stochastic_recon",
                           "stochastic_recon_layerwise"]),
    ("resid_mlp:1+head", ["importance_minimality", "stochastic_recon",
                          "stochastic_recon_layerwise"]),
    ("resid_mlp:2+head", ["faithfulness", "importance_minimality", "pgd_recon_subset",
                          "stochastic_recon_subset"]),
    ("tms:5-2-id+head+pgd", ["importance_minimality", "pgd_recon_subset", "stochastic_recon",
                             "stochastic_recon_layerwise"]),
    ("tms:40-10+pgd+head", ["importance_minimality", "pgd_recon_subset", "stochastic_recon",
                            "stochastic_recon_layerwise"]),
])
def test_the_later_reference_recipes_are_valid_configs(spec, terms):
    from spdjax.config.runs import validate

    c = configs.load(spec)
    validate(c)
    assert sorted(c.losses) == terms and (c.init, c.sigmoid) == ("gaussian", "leaky_hard_clamped")
    assert all(o.get("delta") for n, o in c.losses.items() if "recon" in n)
    assert sorted(c.eval_losses) == ["pgd_recon", "stochastic_hidden_acts_recon"]
    assert c.faithfulness_warmup_steps == 200


def test_eval_losses_take_options_but_no_coeff():
    from spdjax.config.runs import validate

    c = configs.load("tms:5-2")
    with c.unlocked():
        c.eval_losses = {"pgd_recon": {"coeff": 1.0, "n_steps": 2}}
    with pytest.raises(ValueError, match="eval_losses.pgd_recon: evaluation-only terms take no"):
        validate(c)
    with c.unlocked():
        c.eval_losses = {"pgd_recon": {"n_steps": -2}}
    with pytest.raises(ValueError, match="n_steps must be an integer >= 0"):
        validate(c)


def test_adversaries_that_share_sources_refuse_microbatches_and_eval_only_use():
    from spdjax.config.runs import validate

    c = configs.load("resid_mlp:2+head", {"microbatches": 2})
    with pytest.raises(ValueError, match=r"\['pgd_recon_subset'\] share their adversarial"):
        validate(c)
    c = configs.load("tms:5-2")
    with c.unlocked():
        c.eval_losses = {"persistent_pgd_recon": {"n_warmup_steps": 1}}
    with pytest.raises(ValueError, match="keep state across training steps"):
        validate(c)


@pytest.mark.parametrize("variant", ["1", "2"])
def test_resid_mlp_apd_inits_as_the_apd_reference(variant):
    # ApolloResearch/apd: ResidualMLPSPDConfig.init_type defaults to xavier_normal, gain init_scale
    # 2.0, torch's fans of the whole [n_instances = 1, C, d_in, m] tensor.
    a = configs.load(f"resid_mlp:{variant}+apd").apd
    assert (a.init, a.init_scale, a.init_fans) == ("xavier_normal", 2.0, "torch")


def test_resid_mlp_2_head_evaluates_pgd_with_one_source_for_the_batch():
    from spdjax.config.runs import validate

    # goodfire-ai/spd resid_mlp2_config.yaml, eval PGDReconLoss: random init, 20 steps of 0.1,
    # mask_scope shared_across_batch.
    c = configs.load("resid_mlp:2+head")
    validate(c)
    assert c.eval_losses.pgd_recon.to_dict() == {
        "n_steps": 20, "step_size": 0.1, "delta": True, "init": "random",
        "scope": "shared_across_batch"}
