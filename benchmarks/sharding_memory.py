"""Memory per device against the model axis, on 8 fake CPU devices (or the real ones).

    python -m benchmarks.sharding_memory            # C = 1024, writes results/sharding_memory.*
    python -m benchmarks.sharding_memory --C=4096

A tied autoencoder 64 -> 256 -> 64 (sites ``w`` and ``w#2``, aliased ties) decomposed with C per
site, for each CI function and ``mesh_model`` M in 1, 2, 4, 8: the bytes of params + optimizer
state on one device, XLA's temporaries and argument bytes of the compiled step per device, and
the collectives in its HLO (all-gathers would mean a factor moved whole).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re

if "JAX_PLATFORMS" not in os.environ and "XLA_FLAGS" not in os.environ:  # before JAX starts
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

ROOT = pathlib.Path(__file__).resolve().parents[1]
D, H, BATCH = 64, 256, 64
LOSSES = {"faithfulness": {"coeff": 1.0}, "stochastic_recon": {"coeff": 1.0},
          "stochastic_recon_layerwise": {"coeff": 1.0},
          "importance_minimality": {"coeff": 1e-3, "pnorm": 1.0}}


def build(C: int, ci_fn: str, model: int, *, d: int = D, h: int = H, batch: int = BATCH,
          ci_hidden: int = 16, microbatches: int = 1):
    """The tied autoencoder d -> h -> d decomposed with C per site (aliased ties) on a mesh with
    ``model`` devices along C: ``(state, jitted step, replicated target params)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import spdjax
    from spdjax.methods import spd
    from spdjax.training import sharding

    def fn(p, x):
        return jax.nn.relu(x @ p["w"] + p["b"]) @ p["w"].T

    rng = np.random.default_rng(0)
    tp = {"w": jnp.asarray(rng.normal(size=(d, h)) / np.sqrt(d), jnp.float32), "b": jnp.zeros(h)}
    target, tp = spdjax.from_jax(fn, tp, jnp.ones((2, d)))
    dec = spdjax.decompose(target, {"w": C, "w#2": C}, ties={"w#2": "w"}, tie_mode="aliased",
                           ci_fn=ci_fn, ci_hidden=(ci_hidden,))
    mesh = sharding.make_mesh(jax.device_count() // model, model)
    opt = spd.make_optimizer(dec, 1e-3)
    params = sharding.shard_params(dec, dec.init(jax.random.key(0), tp), mesh)
    state, shardings = sharding.place_state(spdjax.init_train_state(params, opt), mesh)
    step = spdjax.make_train_step(
        spd.objective(dec, spdjax.losses.terms_from_config(LOSSES)), opt,
        lambda k: jax.random.normal(k, (batch, d)), total_steps=10, mesh=mesh,
        state_sharding=shardings, microbatches=microbatches)
    return state, step, sharding.replicate(tp, mesh)


def per_device_bytes(tree) -> int:
    """Bytes of ``tree``'s arrays held by the first device."""
    import jax

    dev = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
               for s in leaf.addressable_shards if s.device == dev)


def measure(C: int, ci_fn: str, model: int) -> dict:
    import jax

    state, step, tp = build(C, ci_fn, model)
    compiled = step.lower(state, tp, jax.random.key(1)).compile()
    state_bytes = per_device_bytes(state)
    memory, hlo = compiled.memory_analysis(), compiled.as_text()
    return {"C": C, "ci_fn": ci_fn, "model": model, "devices": jax.device_count(),
            "state_mib_per_device": state_bytes / 2**20,
            "xla_args_mib": memory.argument_size_in_bytes / 2**20,
            "xla_temp_mib": memory.temp_size_in_bytes / 2**20,
            "all_gathers": len(re.findall(r" all-gather\(", hlo)),
            "all_reduces": len(re.findall(r" all-reduce\(", hlo))}


def to_markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['device']} x {rows[0]['devices']}; jax {info['jax']}; commit "
             f"{info['commit']}; {info['date']}", "",
             "| C per site | CI function | mesh_model | params + opt state MiB per device "
             "| XLA args MiB | XLA temp MiB | all-gathers | all-reduces |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['C']} | {r['ci_fn']} | {r['model']} | {r['state_mib_per_device']:.1f} "
                     f"| {r['xla_args_mib']:.1f} | {r['xla_temp_mib']:.1f} | {r['all_gathers']} "
                     f"| {r['all_reduces']} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from benchmarks.run import write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--C", type=int, default=1024)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sharding_memory"))
    args = parser.parse_args(argv)
    rows = [measure(args.C, ci_fn, model) for ci_fn in ("vector_mlp", "mlp")
            for model in (1, 2, 4, 8)]
    write_results(pathlib.Path(args.out), rows, to_markdown)


if __name__ == "__main__":
    main()
