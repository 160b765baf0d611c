"""A projection, not a measurement: one SPD train step of VPD's 4-layer x 768 language model on
one H100, from the FLOPs and bytes XLA counts in our own step at that full shape.

    python -m benchmarks.lm_projection                  # writes benchmarks/results/lm_projection.*
    python -m benchmarks.lm_projection --no-compile    # FLOPs and bytes only (minutes)
    python -m benchmarks.lm_projection --run=10 --out=...   # on a GPU: time and peak memory

The step is lowered, never run (abstract params, ``jax.eval_shape``): the target is our LM family's
transformer at VPD's size (4 layers, d_model 768, 6 heads of 128, MLP 3072, vocabulary 50,277
(the Pile's NeoX tokenizer), 512 positions; pre-LayerNorm, learned positions and GELU where VPD's
has RMSNorm, RoPE and GELU: the same matmuls), every attention and MLP matrix decomposed with
VPD's library config's C (q, k, v, out 768; MLP in and out 3072), its CI function (one causal
transformer over every site: d_model 1088, 8 blocks, 32 heads, ff 4352), its losses (the pooled
merged stochastic-subset + persistent-PGD term with 2 warm-up ascents, KL; smooth-L0 importance
and EMA frequency minimality; relative faithfulness) and Muon, at a batch of 64 sequences (VPD's
2048 over 32 GPUs). XLA's ``cost_analysis`` of the lowered step gives the FLOPs and the bytes
accessed (an upper bound on HBM traffic: it counts every operand as read); the compiled step's
``memory_analysis`` (compiled for this CPU) gives its temporaries with and without the memory
options. Divided by the H100 SXM's datasheet peaks they bound the step time from below.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import optax

import spdjax
from spdjax.config import files as configs
from spdjax.families.lm import model as lm_model
from spdjax.losses import terms_from_config
from spdjax.methods import optimizers, spd

ROOT = pathlib.Path(__file__).resolve().parents[1]
# NVIDIA H100 SXM5 datasheet: dense (no sparsity) tensor-core peaks and HBM3 bandwidth.
H100 = {"bf16_flops": 989e12, "tf32_flops": 494e12, "fp32_flops": 67e12, "hbm_bytes_s": 3.35e12,
        "hbm_gib": 80}
# VPD's shape, and a tiny one with the same structure (--smoke: a CPU check of the script).
SHAPES = {
    "vpd": {"vocab": 50_277, "seq": 512, "d_model": 768, "heads": 6, "layers": 4, "d_mlp": 3072,
            "C": {"blocks_*/attn/*": 768, "blocks_*/mlp_*": 3072},
            "ci": {"d_model": 1088, "layers": 8, "heads": 32, "ff": 4352, "causal": True}},
    "smoke": {"vocab": 1024, "seq": 32, "d_model": 32, "heads": 2, "layers": 1, "d_mlp": 64,
              "C": {"blocks_*/attn/*": 16, "blocks_*/mlp_*": 32},
              "ci": {"d_model": 32, "layers": 1, "heads": 2, "ff": 64, "causal": True}},
}


def build(batch: int, shape: str = "vpd", **cost_options):
    """``(step, abstract args, decomposition params, init)`` of one SPD train step at a shape
    of :data:`SHAPES`; ``init(key)`` makes concrete args."""
    s = SHAPES[shape]
    cfg = lm_model.LMConfig("induction", s["vocab"] - 2, s["seq"], s["d_model"], s["heads"],
                            s["layers"], d_mlp=s["d_mlp"], layer_norm=True, positions="learned",
                            prefix_window=min(61, s["seq"] - 2))
    target = lm_model.target(cfg)
    decomposition = spdjax.decompose(target, s["C"], ci_fn="global_transformer",
                                     ci_options=s["ci"], **cost_options)
    config = configs.load("lm:bytes+vpd")  # VPD's LM loss set (configs/lm.py, config/vpd.py)
    losses = config.losses.to_dict()
    del losses["nonlinearity_locality"]  # its units are the small model's; a cheap term
    losses["stochastic_pgd_recon_subset"]["pool_size"] = 4 * batch
    method = spd.method(decomposition, terms_from_config(losses), 2.8e-4,
                        group_optimizers=optimizers.groups_from_config(
                            config.optimizer.to_dict(), 2.8e-4, 2.8e-4))
    key = jax.random.key(0)
    tp = jax.eval_shape(lambda: lm_model.init_params(key, cfg))
    params = jax.eval_shape(method.init, key, tp)
    opt_state = jax.eval_shape(method.optimizer.init, params)
    ids = jax.ShapeDtypeStruct((batch, s["seq"]), jnp.int32)

    def init(key):
        tp = jax.jit(lm_model.init_params, static_argnums=1)(key, cfg)
        params = jax.jit(method.init)(key, tp)
        return (params, jax.jit(method.optimizer.init)(params), tp,
                jax.random.randint(key, (batch, s["seq"]), 0, s["vocab"]), key)

    def step(params, opt_state, tp, ids, key):
        (loss, _), grads = jax.value_and_grad(method.objective, has_aux=True)(
            params, tp, ids, key, 0.5)
        updates, opt_state = method.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    n_params = sum(x.size for x in jax.tree.leaves(params))
    return step, (params, opt_state, tp, ids, key), n_params, init


def analyse(batch: int, compile_: bool, shape: str = "vpd", **cost_options) -> dict:
    step, args, n_params, _ = build(batch, shape, **cost_options)
    t = time.perf_counter()
    lowered = jax.jit(step).lower(*args)
    cost = lowered.cost_analysis()
    row = {"batch": batch, **cost_options, "decomposition_params": n_params,
           "flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"]),
           "lower_s": time.perf_counter() - t}
    if compile_:
        t = time.perf_counter()
        memory = lowered.compile().memory_analysis()
        row["compile_s"] = time.perf_counter() - t
        row["xla_temp_gib"] = memory.temp_size_in_bytes / 2**30
        row["xla_args_gib"] = memory.argument_size_in_bytes / 2**30
    return row


def measure(batch: int, steps: int, shape: str = "vpd", **cost_options) -> dict:
    """Runs the step on this machine's device: ms/step (compile excluded) and the device's peak
    memory (GPU: ``memory_stats``; CPU: XLA's temporaries of the compiled step)."""
    step, _, n_params, init = build(batch, shape, **cost_options)
    args = init(jax.random.key(0))
    jitted = jax.jit(step, donate_argnums=(0, 1))
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t
    params, opt_state, tp, ids, key = args
    for _ in range(2):  # warm-up
        params, opt_state, loss = compiled(params, opt_state, tp, ids, key)
    jax.block_until_ready(loss)
    t = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = compiled(params, opt_state, tp, ids, key)
    jax.block_until_ready(loss)
    stats = jax.devices()[0].memory_stats() or {}
    return {"shape": shape, "batch": batch, **cost_options, "decomposition_params": n_params,
            "device": str(jax.devices()[0]), "ms_per_step": 1e3 * (time.perf_counter() - t) / steps,
            "compile_s": compile_s, "loss": float(loss),
            "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
            "xla_temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30}


def project(row: dict) -> dict:
    """Lower bounds on the H100 step time: FLOPs at the tensor-core peak, bytes at HBM speed."""
    return {"flops_s_bf16": row["flops"] / H100["bf16_flops"],
            "flops_s_tf32": row["flops"] / H100["tf32_flops"],
            "bytes_s": row["bytes_accessed"] / H100["hbm_bytes_s"]}


def to_markdown(rows: list[dict]) -> str:
    lines = ["Projection (not a measurement) for VPD's 4 x 768 LM, one SPD step, batch "
             f"{rows[0]['batch']} x {SHAPES['vpd']['seq']} tokens, on one H100 SXM (datasheet: "
             f"{H100['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {H100['tf32_flops'] / 1e12:.0f} "
             f"TF32, {H100['hbm_bytes_s'] / 1e12:.2f} TB/s HBM3, {H100['hbm_gib']} GB).", "",
             "| options | TFLOP/step | GB accessed (upper bound) | FLOP time bf16 ms | FLOP time "
             "TF32 ms | all bytes from HBM ms | XLA temp GiB (CPU compile) | args GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = project(r)
        opts = ", ".join(f"{k}={r[k]}" for k in ("output_chunk", "remat_ci", "compute_dtype")
                         if k in r) or "none"
        lines.append(f"| {opts} | {r['flops'] / 1e12:.2f} | {r['bytes_accessed'] / 1e9:.0f} "
                     f"| {1e3 * p['flops_s_bf16']:.0f} | {1e3 * p['flops_s_tf32']:.0f} "
                     f"| {1e3 * p['bytes_s']:.0f} | {r.get('xla_temp_gib', float('nan')):.1f} "
                     f"| {r.get('xla_args_gib', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


VARIANTS = [{}, {"output_chunk": 8}, {"output_chunk": 8, "remat_ci": True},
            {"output_chunk": 8, "remat_ci": True, "compute_dtype": "bfloat16"}]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-compile", dest="compile_", action="store_false",
                        help="FLOPs and bytes only (no memory analysis)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_projection"))
    parser.add_argument("--run", type=int, default=0, metavar="STEPS",
                        help="run STEPS steps of each variant on the device instead (gpu.sh)")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape (a check on CPU)")
    parser.add_argument("--variants", type=int, default=len(VARIANTS),
                        help="the first N of the option variants only")
    args = parser.parse_args(argv)
    shape = "smoke" if args.smoke else "vpd"
    if args.run:
        out, rows = pathlib.Path(args.out), []
        for options in VARIANTS[:args.variants]:
            try:
                rows.append(measure(args.batch, args.run, shape, **options))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, next variant
                rows.append({"shape": shape, "batch": args.batch, **options,
                             "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(json.dumps(rows[-1]), flush=True)
            out.with_suffix(".json").write_text(json.dumps({"rows": rows}, indent=2))
        return
    rows = []
    for options in VARIANTS if args.compile_ else VARIANTS[:1]:
        rows.append(analyse(args.batch, args.compile_, shape, **options))
        print(json.dumps(rows[-1]), flush=True)
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"h100": H100, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
