#!/usr/bin/env bash
# One command for a session that has a GPU: every measurement the project still lacks on an accelerator, each
# written as Markdown (device, versions, date) into benchmarks/results/. Budget: < 8 min on one H100/H200.
#
#   bash benchmarks/gpu_check.sh            # CUDA
#   bash benchmarks/gpu_check.sh --cpu      # the same steps, tiny, on CPU (tests/test_gpu_check.py runs this)
#
# Step time limits add up to 480 s (8 min), so one hung step cannot blow the budget.
# Env: GPU_CHECK_OUT=dir (default benchmarks/results), GPU_CHECK_CPU=1 (same as --cpu).
# Steps: ops benchmark (both shapes, eager + torch.compile), recipe vs bare loop, apply_regularizer speed,
# a 2-epoch bf16 + channels_last + compile training run, a train.strategy=fsdp run (torchrun, 1 process: shard,
# train, checkpoint, resume, export). A failing step is reported and the others still run;
# the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
# The scripts run as benchmarks/*.py, so without this an installed timm_drop would shadow this checkout's.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

mode=cuda
if [[ "${1:-}" == "--cpu" || "${GPU_CHECK_CPU:-0}" == "1" ]]; then mode=cpu; fi
out="${GPU_CHECK_OUT:-benchmarks/results}"
mkdir -p "$out"
failed=0
summary=()

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  if timeout "$limit" "$@"; then
    summary+=("$name: ok ($((SECONDS - t0)) s)")
  else
    summary+=("$name: FAILED rc=$? ($((SECONDS - t0)) s)")
    failed=$((failed + 1))
  fi
}

if [[ $mode == cuda ]]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu')" || exit 1
  step ops 180 python benchmarks/ops.py --device cuda --compile --repeats 10 --warmup 3 --out "$out/ops_cuda.md"
  step recipe_speed 75 python benchmarks/recipe_speed.py --device cuda --out "$out/recipe_speed_cuda.md"
  step apply_speed 45 python benchmarks/apply_speed.py --repeats 2 --out "$out/apply_speed_cuda_host.md"
  step train_smoke 120 python benchmarks/train_smoke.py --device cuda --epochs 2 --precision bf16 \
    --channels-last --compile --out "$out/train_smoke_cuda.md"
  step fsdp_smoke 60 python benchmarks/fsdp_smoke.py --device cuda --nproc 1 --precision bf16 \
    --out "$out/fsdp_smoke_cuda.md"
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  step ops 120 python benchmarks/ops.py --device cpu --shapes 2,8,7,7 --no-compile --repeats 1 --warmup 0 \
    --fraction-maps 16 --threads 1 --out "$out/ops_cpu_twin.md"
  step recipe_speed 120 python benchmarks/recipe_speed.py --device cpu --small --batch-size 8 --steps 1 \
    --out "$out/recipe_speed_cpu_twin.md"
  step apply_speed 120 python benchmarks/apply_speed.py --models resnet18 --repeats 1 \
    --out "$out/apply_speed_cpu_twin.md"
  step train_smoke 120 python benchmarks/train_smoke.py --device cpu --epochs 2 --precision bf16 \
    --channels-last --train-subset 32 --batch-size 16 --out "$out/train_smoke_cpu_twin.md"
  # Accelerate runs FSDP only for GPU launches: the twin lifts that gate in its gloo process (see the script)
  step fsdp_smoke 240 python benchmarks/fsdp_smoke.py --device cpu --nproc 1 --batch-size 16 --precision bf16 \
    --out "$out/fsdp_smoke_cpu_twin.md"
fi

printf '%s\n' "== summary ($mode)" "${summary[@]}"
exit "$failed"
