#!/usr/bin/env bash
# One prepared GPU check for a lent CUDA machine (H200); finishes in under 5 minutes.
# Run from the repository root:  bash benchmarks/gpu.sh      (results in $OUT, or ./gpu-out)
# Measures the bf16 matmul ceiling, ViT-Tiny and ViT-B/16 training and inference img/s and
# utilization at 224 px on synthetic tensors and through the decode cache, peak CUDA memory and
# memory left after release. See benchmarks/gpu_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "== $(date -Is) $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"
# The whole benchmark is bounded so one try leaves device time for a rerun.
timeout 270 python benchmarks/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench.log"
