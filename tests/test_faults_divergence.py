"""Fault injection, issue 36 items 2, 3 and 7: astronomical losses, poisoned checkpoints,
coefficients that cannot train (negative, or all zero)."""

import pytest

import spdjax
from spdjax.config.runs import validate

SMALL = {"steps": 30, "C": 6, "batch_size": 64, "eval_batch_size": 512, "log_every": 5,
         "checkpoint_every": 10, "figures": False}


def small(spec="tms:5-2", **overrides):
    return spdjax.config.load(spec, {**SMALL, **overrides})


# ------------------------------------------------------------------ item 7: coefficients

@pytest.mark.parametrize("term", ["faithfulness", "importance_minimality"])
def test_a_negative_loss_coefficient_is_refused_naming_the_term(term):
    with pytest.raises(ValueError, match=rf"Loss '{term}': coeff must be a finite number >= 0"
                                         r".*got -0\.5"):
        validate(small(**{f"losses.{term}.coeff": -0.5}))
    with pytest.raises(ValueError, match=rf"Loss '{term}': coeff .*>= 0.*got -1\.0"):
        spdjax.term(term, -1.0)


def test_a_negative_apd_coefficient_is_refused():
    with pytest.raises(ValueError, match=r"apd.schatten_coeff must be a finite number >= 0, "
                                         r"got -1\.0"):
        validate(small("tms:5-2+apd", **{"apd.schatten_coeff": -1.0}))


def test_an_identically_zero_spd_objective_is_refused_before_any_work():
    config = small(**{f"losses.{n}.coeff": 0.0 for n in small().losses})
    with pytest.raises(ValueError, match="Every loss coefficient is 0 .*identically zero"):
        validate(config)
    validate(small(**{"losses.faithfulness.coeff": 0.0}))  # one zero is fine


@pytest.mark.parametrize("formulation, coeffs", [
    ("topk", ("faithfulness", "topk_recon", "schatten", "act_recon")),
    ("lp", ("faithfulness", "lp_sparsity", "schatten")),
])
def test_an_identically_zero_apd_objective_is_refused_before_any_work(formulation, coeffs):
    zero = {f"apd.{c}_coeff": 0.0 for c in coeffs}
    with pytest.raises(ValueError, match=rf"Every APD loss coefficient of formulation "
                                         rf"'{formulation}' is 0 .*identically zero"):
        validate(small("tms:5-2+apd", **{"apd.formulation": formulation, **zero,
                                         "apd.lp_sparsity_coeff": 0.0
                                         if formulation == "lp" else 1.0}))
