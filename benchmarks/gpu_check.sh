#!/usr/bin/env bash
# Every check and figure of the docs that needs a GPU, in one command of about 8 minutes on one
# H100 or H200 (each step has its own time limit). Run from the repository root on a CUDA machine:
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# 1. bf16 at 16 x 512 (SmolLM2-135M's shape, random weights): entries at LoRA's count against
#    PEFT LoRA and the frozen floor, 3 interleaved rounds; the target is <= 1.0x LoRA's step time
#    at <= its memory (docs/benchmarks.md, "Training on GPU").
# 2. The same in fp32, the earlier figure, re-measured beside it.
# 3. The CUDA tests and the CPU-kernel and sparse tests.
# Writes OUTDIR/gpu.txt, OUTDIR/train_speed_cuda_16x512_bf16.json, ..._fp32.json and
# OUTDIR/cuda_tests.log; a step that fails or runs out of time does not stop the next.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__)"; } | tee "$out/gpu.txt"
speed() {  # $1: bf16 or fp32
  local flag=(); [ "$1" = bf16 ] && flag=(--bf16)
  timeout 200 "$py" benchmarks/train_speed.py --device cuda --random-init "${flag[@]}" --batch 16 \
    --seq 512 --configs floor entries_lora lora --rounds 3 --steps 8 \
    --out "$out/train_speed_cuda_16x512_$1.json" || echo "train_speed $1: exit $?"
}
speed bf16
speed fp32
timeout 150 "$py" -m pytest -q -p no:cacheprovider tests/unit/train/test_cuda.py \
  tests/unit/train/test_sparse.py tests/unit/train/test_cpu_kernel.py 2>&1 | tee "$out/cuda_tests.log"
