"""The attribution graph of one prompt: ``python -m spdjax.attribution_graph --workdir=DIR
--prompt=TEXT [--position=P,... --threshold=0.1 --name=NAME --out=DIR]``.

Reads the run with :func:`spdjax.load`, encodes the prompt (:mod:`spdjax.cli.prompts`),
computes, prunes and validates its graph (:func:`spdjax.analysis.graphs.build`) and writes
``<out>/<name>.json`` (nodes, edges, validation numbers, the prompt, ``sites``: the figure's rows,
:func:`spdjax.analysis.graphs.site_order`) and ``<out>/<name>.png``
(default ``out``: ``DIR/analysis/graphs``), printing progress of the edges and the PGD
validation on stderr. The edge rows done so far are kept in ``<out>/<name>.partial.npz`` (every
30 s and on Ctrl-C), so the same command after an interruption continues the edges where they
stopped. Errors a user can fix are one ``error:`` line (exit 2).
"""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from spdjax.analysis import graph_plots, graphs
from spdjax.cli import common, prompts

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt (the induction toy: space-separated "
                              "ids, BOS and S allowed; the byte LM: text).")
_POSITION = flags.DEFINE_list("position", [], "Output positions (negative: from the end; default "
                              "the last, none for a model without positions).")
_THRESHOLD = flags.DEFINE_float("threshold", 0.1, "CI above which a subcomponent is a node.")
_TOP_K = flags.DEFINE_integer("top_k", 3, "Output nodes per position (most probable tokens).")
_MASKING = flags.DEFINE_enum("masking", "ci", list(graphs.MASKINGS),
                             "The forward the gradients are taken in: CI masks or all ones.")
_ATTRIBUTION = flags.DEFINE_enum("attribution", "gradient", list(graphs.ATTRIBUTIONS),
                                 "Edge weights: gradient x activation at the prompt, or "
                                 "integrated gradients from every leaf at 0 (sees through "
                                 "saturated attention; ig_steps times the cost).")
_IG_STEPS = flags.DEFINE_integer("ig_steps", graphs.IG_STEPS,
                                 "Integrated gradients: midpoints on the path.")
_NODE_THRESHOLD = flags.DEFINE_float("node_threshold", graphs.NODE_THRESHOLD,
                                     "Pruning: share of the influence the kept nodes carry.")
_EDGE_THRESHOLD = flags.DEFINE_float("edge_threshold", graphs.EDGE_THRESHOLD,
                                     "Pruning: share of the edge score the kept edges carry.")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", 100, "PGD steps of the adversarial check "
                                  "(0: none).")
_PGD_STEP_SIZE = flags.DEFINE_float("pgd_step_size", 0.05, "PGD's signed step on the masks.")
_PGD_RESTARTS = flags.DEFINE_integer("pgd_restarts", 2, "PGD starts (the first from the graph "
                                     "alone, the others random).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of PGD's random starts.")
_NAME = flags.DEFINE_string("name", None, "File name (default: prompt_<hash of the arguments "
                            "and the checkpoint step>).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/analysis/graphs).")
# What the graph depends on: the default file name hashes them all.
# (--attribution and --ig_steps enter only when integrated: a gradient graph keeps its name.)
_ARGUMENTS = (_WORKDIR, _PROMPT, _POSITION, _THRESHOLD, _TOP_K, _MASKING, _NODE_THRESHOLD,
              _EDGE_THRESHOLD, _PGD_STEPS, _PGD_STEP_SIZE, _PGD_RESTARTS, _SEED)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv):
    """Builds, validates and writes the graph (absl entry point); prints the files."""
    common.begin(argv)
    with common.user_errors():
        run, batch, codec = prompts.load_prompt(_WORKDIR.value, _STEP.value, _PROMPT.value)
        out = pathlib.Path(_OUT.value or run.workdir / "analysis" / "graphs")
        out.mkdir(parents=True, exist_ok=True)
        integrated = ({"attribution": _ATTRIBUTION.value, "ig_steps": _IG_STEPS.value}
                      if _ATTRIBUTION.value == "integrated" else {})
        name = _NAME.value or common.result_name("prompt_", _ARGUMENTS, step=run.step,
                                                 **integrated)
        graph = graphs.build(
            run.decomposition, run.params, run.target_params, jnp.asarray(batch),
            positions=prompts.positions(_POSITION.value), threshold=_THRESHOLD.value,
            top_k=_TOP_K.value, masking=_MASKING.value, attribution=_ATTRIBUTION.value,
            ig_steps=_IG_STEPS.value, node_threshold=_NODE_THRESHOLD.value,
            edge_threshold=_EDGE_THRESHOLD.value, decode=codec.decode, progress=_say,
            partial=out / f"{name}.partial.npz",
            validation={"pgd_steps": _PGD_STEPS.value, "pgd_step_size": _PGD_STEP_SIZE.value,
                        "pgd_restarts": _PGD_RESTARTS.value,
                        "key": jax.random.key(_SEED.value)})
        tokens = [codec.decode(int(t)) if codec.decode else str(t) for t in batch[0]] if (
            batch.dtype.kind == "i") else None
        # The figure's rows: the sites in the order the model calls them.
        sites = graphs.site_order(run.decomposition, run.target_params, jnp.asarray(batch))
        record = {"prompt": _PROMPT.value, "ids": batch[0].tolist(), "tokens": tokens,
                  "workdir": str(run.workdir), "step": run.step, "sites": sites,
                  **graph.to_json(),
                  "strongest_path": [graph.nodes[i].name for i in graphs.strongest_path(graph)]}
        (out / f"{name}.json").write_text(json.dumps(record, indent=1))
        png = graph_plots.plot_graph(graph, out / f"{name}.png",
                                     site_order=sites, tokens=tokens)
        v = graph.validation
        print(out / f"{name}.json")
        print(png)
        print(f"{v['n_nodes']} subcomponent nodes, {v['n_edges']} edges (unpruned: "
              f"{graph.settings['unpruned']['n_nodes']}, {graph.settings['unpruned']['n_edges']}"
              f"); KL graph-only {v['kl_graph_only']:.4g}, CI-masked {v['kl_ci_masked']:.4g}"
              + (f", worst under PGD {v['kl_pgd_worst']:.4g}" if "kl_pgd_worst" in v else ""))
        print("strongest path: " + " -> ".join(record["strongest_path"]))
        print("nodes by site and position: " + ", ".join(
            f"{k} ({v})" for k, v in graph.node_counts(sites).items()))


def run() -> None:
    """The ``python -m spdjax.attribution_graph`` entry."""
    flags.mark_flags_as_required(["workdir", "prompt"])
    app.run(main)


if __name__ == "__main__":
    run()
