#!/usr/bin/env bash
# Every GPU measurement the open speed and reproduction issues ask for, in one call of a few
# minutes (run it from the repository root on the device machine; results go to
# benchmarks/results/gpu/, or to $OUT/gpu when $OUT is set, as the device tool's runs do):
#   1. step times of every config (benchmarks.run), at K = 1, 10, 100 steps per call;
#   2. the matmul precisions (highest / tensorfloat32 / bfloat16) on TMS 5-2 and ResidMLP 1;
#   3. each training term's cost (benchmarks.term_costs);
#   4. a short APD vs SPD pair and the ResidMLP 1-layer seed table's first seed (if time allows).
# Usage: bash benchmarks/gpu.sh [--quick]   (--quick: 30 timed steps, for a smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=200
[[ "${1:-}" == "--quick" ]] && STEPS=30
DIR="${OUT:-benchmarks/results}/gpu"
mkdir -p "$DIR"
python -c "import jax; print(jax.devices())" | tee "$DIR/devices.txt"
for K in 1 10 100; do  # the same number of steps at each K: STEPS / K calls (at least 2)
  CALLS=$(( STEPS / K > 2 ? STEPS / K : 2 ))
  python -m benchmarks.run --steps="$CALLS" --out="$DIR/step_times_k$K" \
    --overrides="{\"steps_per_call\": $K}"
done
for P in highest tensorfloat32 bfloat16; do
  python -m benchmarks.run --configs=tms:5-2,resid_mlp:1 --steps="$STEPS" \
    --out="$DIR/precision_$P" --overrides="{\"matmul_precision\": \"$P\"}"
done
python -m benchmarks.term_costs --steps="$STEPS" --out="$DIR/term_costs"
if [[ "${1:-}" != "--quick" ]]; then
  python -m benchmarks.reproduce.tms_table1 --variants=5-2+apd,5-2 --seeds=0 \
    --root="$DIR/workdir" --out="$DIR/tms_table1"
  python -m benchmarks.reproduce.resid_mlp_seeds --variant=1 --seeds=0 \
    --root="$DIR/workdir" --out="$DIR/resid_mlp_seeds"
fi
echo "results in $DIR"
