"""What an L3D training step spends its time on, part by part, each jitted alone:

* ``per_sample_grads``: the dense per-sample gradients (``vmap`` of ``grad``, ``[batch, *shape]``
  per tensor);
* ``grad_factors``: the same kept as outer-product factors on linear sites
  (:meth:`~spdjax.methods.l3d_decomposition.L3DDecomposition.loss_grads`, what the step takes);
* ``loss_explicit``: the loss and its gradient with ``g_hat`` formed from every subnetwork's
  dense decoder tensor (:func:`~spdjax.methods.l3d_terms.reconstruct`), from the dense gradients;
* ``loss_factored``: the same from the Tucker factors and the decoder Gram
  (:func:`~spdjax.methods.l3d_terms.reconstruction_errors`), from the dense gradients;
* ``loss_factored_outer``: that from the outer-product factors (the step's path);
* ``renormalise``: the decoder's renormalisation (from the factor Grams).

Each (config, batch size) in a fresh process; compile excluded, the median of ``--calls``
calls; the 1-minute load average read before.

    python -m benchmarks.l3d_step_parts --configs=l3d:resid-mlp-1,l3d:tmcs --batch_sizes=32,256

The whole step's cost is ``benchmarks/reproduce/three_methods.py``'s (``--row=<config>@<batch>``).
Writes ``benchmarks/results/l3d_step_parts.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

from benchmarks.run import machine, row_in_fresh_process

PARTS = ("per_sample_grads", "grad_factors", "loss_explicit", "loss_factored",
         "loss_factored_outer", "renormalise")


def _median_ms(fn, args, calls: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_parts(name: str, batch_size: int, calls: int) -> dict:
    """Milliseconds per call of each of :data:`PARTS` (run inside a child process)."""
    import jax

    import spdjax
    from spdjax.methods import l3d_terms

    load_before = os.getloadavg()[0]
    config = spdjax.config.load(name, {"batch_size": batch_size, "figures": False})
    if config.method != "l3d":
        raise ValueError(f"{name} is a {config.method!r} config; expected an L3D one.")
    run = spdjax.setup(config)
    d, tp, params, topk = run.method.decomposition, run.target_params, run.params, config.l3d.topk
    x = run.experiment.batch_fn(jax.random.key(1))
    key = jax.random.key(2)
    grads_fn, factors_fn = jax.jit(d.per_sample_grads), jax.jit(d.loss_grads)
    grads, factors = grads_fn(tp, x, key), factors_fn(tp, x, key)

    def factored(p, g):
        return l3d_terms.relative_error(*l3d_terms.reconstruction_errors(d, p, g, topk)[:2])

    def explicit(p, g):
        return l3d_terms.dense_relative_error(g, l3d_terms.reconstruct(d, p, g, topk)[0])

    factored_fn = jax.jit(jax.value_and_grad(factored))
    parts = {
        "per_sample_grads": (grads_fn, (tp, x, key)),
        "grad_factors": (factors_fn, (tp, x, key)),
        "loss_explicit": (jax.jit(jax.value_and_grad(explicit)), (params, grads)),
        "loss_factored": (factored_fn, (params, grads)),
        "loss_factored_outer": (factored_fn, (params, factors)),
        "renormalise": (jax.jit(lambda dec: d.normalise(dec, config.l3d.normalisation)),
                        (params["decode"],)),
    }
    ms = {part: _median_ms(fn, args, calls) for part, (fn, args) in parts.items()}
    return {"config": name, "batch_size": batch_size, "n_params": d.n_params, "C": d.C,
            "calls": calls, "ms": ms, "load_avg_1m": load_before}


def to_markdown(result: dict) -> str:
    info = result["machine"]
    lines = [f"{info['device']}, {info['cpu_count']} cores; median of {result['calls']} calls "
             "per part, compile excluded, one fresh process per row; 1-minute load average "
             "before each.", "",
             "| config | batch | " + " | ".join(f"{p} ms" for p in PARTS) + " | load avg |",
             "|---|---|" + "---|" * len(PARTS) + "---|"]
    for r in result["rows"]:
        lines.append(f"| `{r['config']}` | {r['batch_size']} | "
                     + " | ".join(f"{r['ms'][p]:.1f}" for p in PARTS)
                     + f" | {r['load_avg_1m']:.1f} |")
    return "\n".join(lines + ["", f"Command: `{result['command']}`; {info['date']}, commit "
                                  f"{info['commit']}."]) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="l3d:resid-mlp-1,l3d:tmcs")
    p.add_argument("--batch_sizes", default="32,256")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--row", help="internal: time one 'config@batch_size@calls', print JSON")
    args = p.parse_args(argv)
    if args.calls < 1:
        raise ValueError(f"--calls must be at least 1, got {args.calls}.")
    if args.row:
        name, bs, calls = args.row.rsplit("@", 2)
        print(json.dumps(time_parts(name, int(bs), int(calls))))
        return
    rows = []
    for name in args.configs.split(","):
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            rows.append(row_in_fresh_process("benchmarks.l3d_step_parts",
                                             f"{name}@{bs}@{args.calls}"))
            print(json.dumps(rows[-1]), flush=True)
    command = "python -m benchmarks.l3d_step_parts " + " ".join(argv or sys.argv[1:])
    result = {"command": command, "machine": machine(), "calls": args.calls, "rows": rows}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "l3d_step_parts.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "l3d_step_parts.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
