"""Interventions on one prompt: ``python -m spdjax.intervene --workdir=DIR --prompt=TEXT
[--ablate=site:idx[@pos],... | --keep=site:idx[@pos],...] [--optimize_token=ID]``.

``--ablate`` runs the decomposition with the named subcomponents masked to 0 (the others at
``--base``, default 1); ``--keep`` with only them (the others at ``--base``, default 0); both
print the top-``k`` predictions at ``--position`` (target and intervened) and KL(target ||
intervened) (:func:`spdjax.analysis.interventions.intervene`). ``--optimize_token`` instead
looks for a sparse set of subcomponents that keeps that token
(:func:`spdjax.analysis.interventions.optimize_sparse_ci`), printing progress. The result is
also written to ``<out>/<name>.json`` (default ``out``: ``DIR/analysis/interventions``).
Errors a user can fix are one ``error:`` line (exit 2).
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from spdjax.analysis import interventions as iv
from spdjax.cli import common, prompts

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt (as for spdjax.attribution_graph).")
_ABLATE = flags.DEFINE_string("ablate", "", "Subcomponents to mask to 0: site:idx[@pos],...")
_KEEP = flags.DEFINE_string("keep", "", "Subcomponents to keep at 1: site:idx[@pos],...")
_BASE = flags.DEFINE_enum("base", None, list(iv.BASES), "Masks of the others (default: zeros "
                          "with --keep, else ones).")
_POSITION = flags.DEFINE_list("position", [], "Output positions (negative: from the end; default "
                              "the last, none for a model without positions).")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Predictions listed per position.")
_TOKEN = flags.DEFINE_integer("optimize_token", None, "Optimise a sparse CI that keeps this "
                              "output token at the (first) --position.")
_STEPS = flags.DEFINE_integer("steps", 300, "Optimisation steps.")
_LR = flags.DEFINE_float("lr", 0.05, "Optimisation learning rate (Adam).")
_COEFF = flags.DEFINE_float("coeff", 0.01, "Sparsity coefficient.")
_PNORM = flags.DEFINE_float("pnorm", 1.0, "Sparsity exponent p of sum g^p.")
_MASK_TYPE = flags.DEFINE_enum("mask_type", "ci", list(iv.MASK_TYPES),
                               "Masks during optimisation: the CI, or stochastic g + (1-g)u.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the stochastic masks.")
_NAME = flags.DEFINE_string("name", None, "File name (default: a hash of the arguments and the "
                            "checkpoint step).")
_OUT = flags.DEFINE_string("out", None,
                           "Output directory (default: <workdir>/analysis/interventions).")
# What the result depends on: the default file name hashes them all.
_ARGUMENTS = (_WORKDIR, _PROMPT, _ABLATE, _KEEP, _BASE, _POSITION, _TOP_K, _TOKEN, _STEPS, _LR,
              _COEFF, _PNORM, _MASK_TYPE, _SEED)


def _table(rows) -> str:
    return "  ".join(f"{t.get('text', t['token'])!s}:{t['prob']:.3f}" for t in rows)


def main(argv):
    """Runs the intervention or the optimisation (absl entry point) and prints the result."""
    common.begin(argv)
    with common.user_errors():
        run, batch, codec = prompts.load_prompt(_WORKDIR.value, _STEP.value, _PROMPT.value)
        batch = jnp.asarray(batch)
        positions = prompts.positions(_POSITION.value)
        args = (run.decomposition, run.params, run.target_params, batch)
        if _TOKEN.value is not None:
            if _ABLATE.value or _KEEP.value:
                raise ValueError("--optimize_token finds its own set: leave --ablate and --keep "
                                 "out.")
            res = iv.optimize_sparse_ci(
                *args, token=_TOKEN.value, position=positions[0] if positions else -1,
                steps=_STEPS.value, lr=_LR.value, coeff=_COEFF.value, pnorm=_PNORM.value,
                mask_type=_MASK_TYPE.value, key=jax.random.key(_SEED.value),
                progress=lambda s, n, row: print(
                    f"optimise: step {s}/{n} | CE {row['ce']:.4g} | sum g^p "
                    f"{row['sparsity']:.4g}", file=sys.stderr, flush=True))
            record = {"kind": "optimize_sparse_ci", **res.to_json()}
            kept = iv.describe(iv.Subcomponent(s, c, p) for s, c, p, _ in res.kept)
            text = (f"kept {len(res.kept)} subcomponent-positions with mask > "
                    f"{res.threshold} (the CI function's own masks: {res.n_ci_above}): "
                    f"{kept}\np(token {res.token}): target "
                    f"{res.prob_target:.4f}, optimised masks {res.prob_masked:.4f}, the set "
                    f"alone {res.prob_kept:.4f}; KL {res.kl_masked:.4g} / {res.kl_kept:.4g}")
        else:
            if not (_ABLATE.value or _KEEP.value):
                raise ValueError("Nothing to do: pass --ablate, --keep or --optimize_token.")
            res = iv.intervene(*args, keep=iv.parse_subcomponents(_KEEP.value),
                               ablate=iv.parse_subcomponents(_ABLATE.value), base=_BASE.value,
                               positions=positions, k=_TOP_K.value, decode=codec.decode)
            record = {"kind": "intervene", "keep": _KEEP.value, "ablate": _ABLATE.value,
                      **res.to_json()}
            lines = [f"KL(target || intervened) {res.kl:.4g}; {res.n_kept} subcomponent-"
                     "positions on"]
            for p, t, m in zip(res.positions or [None], res.target_top, res.masked_top):
                where = "output" if p is None else f"position {p}"
                lines += [f"{where}: target      {_table(t)}",
                          f"{'':>{len(where) + 2}}intervened  {_table(m)}"]
            text = "\n".join(lines)
        record.update(prompt=_PROMPT.value, workdir=str(run.workdir), step=run.step)
        out = pathlib.Path(_OUT.value or run.workdir / "analysis" / "interventions")
        out.mkdir(parents=True, exist_ok=True)
        name = _NAME.value or common.result_name("intervention_", _ARGUMENTS, step=run.step)
        (out / f"{name}.json").write_text(json.dumps(record, indent=1))
        print(text)
        print(out / f"{name}.json")


def run() -> None:
    """The ``python -m spdjax.intervene`` entry."""
    flags.mark_flags_as_required(["workdir", "prompt"])
    app.run(main)


if __name__ == "__main__":
    run()
