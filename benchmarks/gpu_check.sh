#!/usr/bin/env bash
# One command for a session that has a GPU: every measurement the project still lacks on an accelerator, each
# written as Markdown (device, versions, date) into benchmarks/results/ as soon as its step ends.
#
#   bash benchmarks/gpu_check.sh            # CUDA
#   bash benchmarks/gpu_check.sh --cpu      # the same steps, tiny, on CPU (tests/tools/test_gpu_check.py runs this)
#
# The whole check ends within GPU_CHECK_BUDGET_S seconds (default 420 on CUDA, 900 for the CPU twin): a lent GPU comes with ~15 minutes of
# device time, machine start and file transfer included, and a call that outruns its limit returns no files.
# Each step runs under the smaller of its own limit and what is left of the budget, is killed (TERM, then KILL
# 10 s later) when it overruns, and a step with under 20 s left is skipped and reported. The most wanted numbers
# come first: eager ops on both shapes (AttentionDrop's speed target), then training, apply and FSDP, and the
# compiled ops last (compiling every row for two shapes is the slowest step).
# Env: GPU_CHECK_OUT=dir (default benchmarks/results), GPU_CHECK_CPU=1 (same as --cpu), GPU_CHECK_BUDGET_S.
# A failing step is reported and the others still run; the exit status is the number of failed or skipped steps.
# On 2026-12-04 a first device run without the budget (step limits summing to 480 s, TERM only) overran a
# 540 s call limit and returned nothing.
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
budget="${GPU_CHECK_BUDGET_S:-$([[ $mode == cuda ]] && echo 420 || echo 900)}"
t_start=$SECONDS

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - t_start)))
  if ((left < 20)); then
    summary+=("$name: SKIPPED (${left} s of the ${budget} s budget left)")
    failed=$((failed + 1))
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS rc=0
  echo "== $name (limit ${limit} s): $*"
  timeout -k 10 "$limit" "$@" || rc=$?
  if ((rc == 0)); then
    summary+=("$name: ok ($((SECONDS - t0)) s)")
  else
    summary+=("$name: FAILED rc=$rc ($((SECONDS - t0)) s)")
    failed=$((failed + 1))
  fi
}

if [[ $mode == cuda ]]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu')" || exit 1
  step ops 90 python benchmarks/ops.py --device cuda --no-compile --repeats 10 --warmup 3 --out "$out/ops_cuda.md"
  step train_smoke 90 python benchmarks/train_smoke.py --device cuda --epochs 2 --precision bf16 \
    --channels-last --compile --out "$out/train_smoke_cuda.md"
  step recipe_speed 60 python benchmarks/recipe_speed.py --device cuda --out "$out/recipe_speed_cuda.md"
  step apply_speed 40 python benchmarks/apply_speed.py --repeats 2 --out "$out/apply_speed_cuda_host.md"
  step fsdp_smoke 60 python benchmarks/fsdp_smoke.py --device cuda --nproc 1 --precision bf16 \
    --out "$out/fsdp_smoke_cuda.md"
  step ops_compiled 150 python benchmarks/ops.py --device cuda --compile --repeats 10 --warmup 3 \
    --fraction-maps 0 --out "$out/ops_compiled_cuda.md"
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  step ops 120 python benchmarks/ops.py --device cpu --shapes 2,8,7,7 --no-compile --repeats 1 --warmup 0 \
    --fraction-maps 16 --threads 1 --out "$out/ops_cpu_twin.md"
  step train_smoke 120 python benchmarks/train_smoke.py --device cpu --epochs 2 --precision bf16 \
    --channels-last --train-subset 32 --batch-size 16 --out "$out/train_smoke_cpu_twin.md"
  step recipe_speed 120 python benchmarks/recipe_speed.py --device cpu --small --batch-size 8 --steps 1 \
    --out "$out/recipe_speed_cpu_twin.md"
  step apply_speed 120 python benchmarks/apply_speed.py --models resnet18 --repeats 1 \
    --out "$out/apply_speed_cpu_twin.md"
  # Accelerate runs FSDP only for GPU launches: the twin lifts that gate in its gloo process (see the script)
  step fsdp_smoke 240 python benchmarks/fsdp_smoke.py --device cpu --nproc 1 --batch-size 16 --precision bf16 \
    --out "$out/fsdp_smoke_cpu_twin.md"
  # the compile path without code generation: inductor's C++ build of every row would take minutes on 2 cores
  step ops_compiled 120 python benchmarks/ops.py --device cpu --shapes 2,8,7,7 --compile --compile-backend \
    aot_eager --repeats 1 --warmup 0 --fraction-maps 0 --threads 1 --out "$out/ops_compiled_cpu_twin.md"
fi

printf '%s\n' "== summary ($mode)" "${summary[@]}"
exit "$failed"
