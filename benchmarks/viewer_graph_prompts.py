"""The graph explorer's time per new prompt (:func:`spdjax.view.graph_api.graph_json`): a first
prompt, a second prompt of the same length, and one of another length, each a new graph (none
kept from before), on one finished language-model run. Prints one JSON line.

    python -m benchmarks.viewer_graph_prompts --workdir=tests/fixtures/lm_ih_tiny
    python -m benchmarks.viewer_graph_prompts --workdir=workdir/ih_base3k_s0

The default prompts are the induction toy's (``BOS a b c S a b c S``); pass ``--prompts`` (three,
``|``-separated) for another run.
"""

import argparse
import json
import time

import spdjax
from spdjax.view import graph_api

PROMPTS = "BOS 1 2 3 S 1 2 3 S|BOS 7 8 9 S 7 8 9 S|BOS 4 5 6 7 S 4 5 6 7 S"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--prompts", default=PROMPTS, help="three prompts, |-separated")
    a = ap.parse_args()
    prompts = a.prompts.split("|")
    if len(prompts) != 3:
        raise SystemExit(f"error: --prompts must be three prompts separated by '|', got "
                         f"{len(prompts)}.")
    run = spdjax.load(a.workdir)
    out = {"workdir": a.workdir}
    for label, prompt in zip(("first", "same_length", "other_length"), prompts):
        t0 = time.perf_counter()
        g = graph_api.graph_json(run, {"prompt": prompt, "prune": False})
        out[f"{label}_s"] = round(time.perf_counter() - t0, 3)
        out[f"{label}_nodes"] = g["unpruned"]["n_nodes"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
