#!/usr/bin/env bash
# Every GPU measurement the speed and fidelity issues ask for, in one call that ends within
# $GPU_BUDGET_S seconds (default 420: every stage gets what is left, later ones are skipped, and the
# seed runs are stopped at the deadline), run from the repository root on the GPU machine:
#   0. a 100-step CLI smoke run (stops here if the installed jax/flax cannot run spdjax);
#   1. step times (benchmarks.run) at K = 1, 10, 100 steps per jitted call;
#   2. the matmul precisions (tensorfloat32 / bfloat16; highest is stage 1) at K = 100, and their
#      effect on the final numbers: TMS 5-2 runs in highest and bfloat16 (ResidMLP 1 seed 0 in
#      bfloat16 runs beside stage 3's float32 seeds);
#   2c. the LM step at VPD's size (4 x 768, vocabulary 50,277, 512 positions, batch $GPU_LM_BATCH,
#      default 64) with the memory and precision options (output_chunk, remat_ci, bfloat16):
#      ms/step and peak GPU memory per option set (benchmarks.lm_projection --run; at most
#      $GPU_LM_COST_S seconds, default 240; --quick: a tiny shape, one option set);
#   3. the ResidMLP 1-layer seed table, its five seeds as five processes sharing the GPU
#      (full paper recipe, K = 100 steps per call, float32 "highest").
# Everything runs with microbatches = 1 (the configs' micro-batching is for CPU caches).
# Results go to $GPU_RESULTS (default benchmarks/results/gpu), run directories to $GPU_WORKDIR.
# On the project's lent H100 (python with jax 0.11.2 at /opt/torch/.venv/bin, no ml_collections;
# nothing can be fetched there) the device call was, carrying .whl (the ml_collections wheel) and
# .gpucache (targets trained here: SPDJAX_CACHE=.gpucache python -c "...spdjax.setup(config)"):
#   export PATH=/opt/torch/.venv/bin:$PATH SPDJAX_CACHE=$PWD/.gpucache GPU_RESULTS=/tmp/res
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/ml_collections-*.whl
#   export PYTHONPATH=/tmp/site:$PWD; bash benchmarks/gpu.sh 2>&1 | tee $OUT/log.txt
#   tar czf $OUT/res.tgz -C /tmp res   # $OUT takes at most 8 files
# (with `python` on PATH: a script that execs python3). Give it GPU_BUDGET_S well under the call's
# limit and write nothing under $OUT while the call may be killed: a call killed at its limit
# on 2026-11-27 brought nothing back.
# Usage: bash benchmarks/gpu.sh [--quick]   (--quick: few timed steps and 300-step seeds: a smoke
# test of the script itself, e.g. on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=200 SEED_ARGS=() TMS_ARGS=() LM_CONFIG=${GPU_LM:-}  # e.g. GPU_LM=lm:bytes (builds its target there)
LM_COST_ARGS=(--batch="${GPU_LM_BATCH:-64}")
ALL=tms:5-2,tms:40-10,resid_mlp:1,resid_mlp:3 PAIR=tms:5-2,resid_mlp:1
if [[ "${1:-}" == "--quick" ]]; then
  STEPS=20 SEED_ARGS=(--steps=300 --set=eval_batch_size=2000) LM_CONFIG= ALL=tms:5-2 PAIR=tms:5-2
  TMS_ARGS=(--config.steps=300 --config.figures=false)
  LM_COST_ARGS=(--smoke --batch=2 --variants=1)
fi
DIR="${GPU_RESULTS:-benchmarks/results/gpu}"
ROOT="${GPU_WORKDIR:-workdir/gpu}"
mkdir -p "$DIR" "$ROOT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the seed processes share one GPU
stage() { echo "=== $(date -u +%H:%M:%S) $*"; }
START=$(date +%s) BUDGET=${GPU_BUDGET_S:-420}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
budgeted() {  # runs "$@" with the time left (none if under 30 s): the call ends on time
  local l; l=$(left)
  if (( l < 30 )); then echo "skipped, out of time: $*"; return 1; fi
  timeout "$l" "$@"
}

stage 0 devices and smoke run
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
} | tee "$DIR/devices.txt"
budgeted python -m spdjax.main --config=configs/tms.py:5-2 --config.steps=100 --config.log_every=50 \
  --config.checkpoint_every=50 --workdir="$ROOT/smoke" || { echo "smoke run failed"; exit 1; }

bench() {  # bench OUT_NAME K CONFIGS [extra JSON overrides]
  local calls=$(( STEPS / $2 > 2 ? STEPS / $2 : 2 ))
  budgeted python -m benchmarks.run --configs="$3" --steps="$calls" --out="$DIR/$1" \
    --overrides="{\"steps_per_call\": $2, \"microbatches\": 1${4:+, $4}}" || echo "benchmark $1 failed"
}
stage 1 steps per call
bench step_times_k1 1 "$ALL"
bench step_times_k10 10 "$PAIR"
bench step_times_k100 100 "$ALL"
stage 2 matmul precision
for P in tensorfloat32 bfloat16; do
  bench "precision_$P" 100 "$PAIR" "\"matmul_precision\": \"$P\""
done
stage 2b precision on the final numbers: TMS 5-2 paper runs in highest and bfloat16
for P in highest bfloat16; do  # (the float32 ResidMLP seed 0 is stage 3)
  budgeted python -m spdjax.main --config=configs/tms.py:5-2 --config.matmul_precision=$P \
    --config.steps_per_call=100 "${TMS_ARGS[@]}" --workdir="$ROOT/precision_tms_5-2_$P" \
    > "$DIR/precision_tms_5-2_$P.log" 2>&1 || echo "TMS 5-2 $P failed or timed out"
  cp "$ROOT/precision_tms_5-2_$P/summary.json" "$DIR/precision_tms_5-2_$P.json" 2>/dev/null
done
if [[ -n "$LM_CONFIG" ]]; then  # its target and corpus are built there first (about a minute)
  budgeted python -m benchmarks.run --configs="$LM_CONFIG" --steps=20 --out="$DIR/step_times_lm" \
    || echo "LM benchmark failed or timed out"
fi

stage 2c LM cost at VPD size with output_chunk, remat_ci and bfloat16
L=$(left); (( L > ${GPU_LM_COST_S:-240} )) && L=${GPU_LM_COST_S:-240}
if (( L < 30 )); then echo "skipped, out of time: LM cost"
else
  timeout "$L" python -m benchmarks.lm_projection --run=10 "${LM_COST_ARGS[@]}" --out="$DIR/lm_cost" \
    > "$DIR/lm_cost.log" 2>&1 || echo "LM cost stage failed or timed out (rows so far: $DIR/lm_cost.json)"
  tail -n 4 "$DIR/lm_cost.log"
fi

stage 3 ResidMLP 1-layer seeds, in parallel, and seed 0 in bfloat16 beside them
budgeted python -m benchmarks.reproduce.resid_mlp_seeds --variant=1 --seeds=0 "${SEED_ARGS[@]}" \
  --set=steps_per_call=100 --set=microbatches=1 --set=matmul_precision=bfloat16 --root="$ROOT/bf16" \
  --out="$DIR/resid_mlp_seeds_bf16" > "$DIR/resid_mlp_bf16.log" 2>&1 &
for SEED in 0 1 2 3 4; do
  budgeted python -m benchmarks.reproduce.resid_mlp_seeds --variant=1 --seeds="$SEED" "${SEED_ARGS[@]}" \
    --set=steps_per_call=100 --set=microbatches=1 --root="$ROOT" --out="$DIR/resid_mlp_seeds_s$SEED" \
    > "$DIR/resid_mlp_seed$SEED.log" 2>&1 &
done
wait
tail -n 3 "$DIR"/resid_mlp_seed*.log
stage done: results in "$DIR"
