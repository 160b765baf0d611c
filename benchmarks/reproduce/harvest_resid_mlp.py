"""Issue #39's harvest and dataset-attribution ground truth on a ResidMLP 1-layer decomposition:
read off the harvest alone, is each feature's ``mlp_in`` subcomponent the one that fires when
the feature is active (recall) and only then (precision), does the ``mlp_out`` block fire with
it, and is the feature the top dataset-attribution source of its ``mlp_in`` subcomponent?

    python -m spdjax.harvest --workdir=workdir/resid_mlp_1_3k --batches=40 --batch_size=1024
    python -m spdjax.dataset_attributions --workdir=workdir/resid_mlp_1_3k --batches=5 \\
        --batch_size=256
    python -m benchmarks.reproduce.harvest_resid_mlp --workdir=workdir/resid_mlp_1_3k \\
        --out=harvest_resid_mlp_3k      # -> benchmarks/results/harvest_resid_mlp_3k.{json,md}

A feature is an input "token" of the harvest (:meth:`Harvest.best_by_recall`); the SPD paper's
solution (its Figs. 8, 12) has one ``mlp_in`` subcomponent per feature and an ``mlp_out`` whose
live subcomponents all co-activate.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.run import ROOT, write_results

from spdjax.analysis import dataset_attributions, harvest


def read_off(h: harvest.Harvest, attr: dataset_attributions.DatasetAttributions | None,
             s_in: str = "layers_0/mlp_in", s_out: str = "layers_0/mlp_out") -> dict:
    """The numbers of the module docstring from a harvest (and dataset attributions), for the
    layer whose sites are ``s_in`` and ``s_out``."""
    best, recall, precision = h.best_by_recall(s_in)
    best_out, _, precision_out = h.best_by_recall(s_out)
    F = len(best)
    i_in, i_out = h.spec.offsets()[s_in] + best, h.spec.offsets()[s_out] + best_out
    cooc, count = h.cooccurrence, h.count
    off_out = h.spec.offsets()[s_out]
    C_out = h.spec.sizes[h.spec.sites.index(s_out)]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_out_given_in = cooc[i_in, i_out] / np.maximum(count[i_in], 1)
    partner = np.argmax(cooc[i_in][:, off_out:off_out + C_out], axis=1)
    dens_out = h.density[off_out:off_out + C_out]
    live = dens_out > 0
    out = {"n_examples": h.n, "features": F,
           "distinct_best_mlp_in": int(len(set(best.tolist()))),
           "shared_best_mlp_in": int(sum(np.bincount(best) > 1)),
           "recall_median": float(np.median(recall)), "recall_min": float(recall.min()),
           "precision_median": float(np.median(precision)),
           "precision_q25": float(np.quantile(precision, 0.25)),
           "precision_q10": float(np.quantile(precision, 0.10)),
           "precision_ge_90": int(np.sum(precision >= 0.9)),
           "distinct_best_mlp_out": int(len(set(best_out.tolist()))),
           "precision_out_median": float(np.median(precision_out)),
           "p_out_given_in_median": float(np.median(p_out_given_in)),
           "p_out_given_in_min": float(p_out_given_in.min()),
           "partner_is_best_out": int(np.sum(partner == best_out)),
           "live_mlp_out": int(live.sum()),
           "live_mlp_out_density_median": float(np.median(dens_out[live])) if live.any() else 0.0,
           "live_mlp_out_density_ge_90": int(np.sum(dens_out >= 0.9))}
    if attr is not None:
        top = [attr.top_sources(f"{s_in}:{c}", 1) for c in best]
        out["attribution_top_source_is_feature"] = int(sum(
            bool(t) and t[0][0] == f"input:{f}" for f, t in enumerate(top)))
    return out


ROWS = [  # (label, format)
    ("distinct best `mlp_in` subcomponents over the {features} features",
     "{distinct_best_mlp_in} ({shared_best_mlp_in} are the best of 2+ features)"),
    ("recall of the best, median / min", "{recall_median:.3f} / {recall_min:.3f}"),
    ("precision of the best, median / 25% / 10% quantile",
     "{precision_median:.3f} / {precision_q25:.3f} / {precision_q10:.3f}"),
    ("features whose best has precision >= 0.9", "{precision_ge_90} of {features}"),
    ("`mlp_out`: best by recall, distinct / precision median",
     "{distinct_best_mlp_out} / {precision_out_median:.3f}"),
    ("`mlp_out`: live (fire at all) / their density median / density >= 0.9",
     "{live_mlp_out} / {live_mlp_out_density_median:.3f} / {live_mlp_out_density_ge_90}"),
    ("P(the feature's best `mlp_out` fires \\| its `mlp_in` fires), median / min",
     "{p_out_given_in_median:.3f} / {p_out_given_in_min:.3f}"),
    ("the `mlp_in`'s most frequent `mlp_out` partner is the feature's best `mlp_out`",
     "{partner_is_best_out} of {features}"),
    ("dataset attributions: feature i is the top source of its `mlp_in` subcomponent",
     "{attribution_top_source_is_feature} of {features}"),
]


def markdown(r: dict) -> str:
    lines = [f"Harvest of {r['n_examples']} examples ({r['workdir']}).", "", "| | value |",
             "|---|---|"]
    for label, fmt in ROWS:
        try:
            lines.append(f"| {label.format(**r)} | {fmt.format(**r)} |")
        except KeyError:  # no dataset attributions
            continue
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="workdir/resid_mlp_1_3k")
    ap.add_argument("--out", default="harvest_resid_mlp")
    args = ap.parse_args(argv)
    h = harvest.load_harvest(args.workdir)
    try:
        attr = dataset_attributions.load_attributions(args.workdir)
    except FileNotFoundError:
        attr = None
    r = dict(read_off(h, attr), workdir=str(args.workdir))
    write_results(ROOT / "benchmarks" / "results" / args.out, [r],
                  lambda rows, machine: markdown(rows[0]))
    print(markdown(r))


if __name__ == "__main__":
    main()
