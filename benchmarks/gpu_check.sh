#!/usr/bin/env bash
# orchmoe on one GPU in a few minutes, offline: train / eval / adapt of every routing method in bf16, merged
# against unmerged logits, a host-device synchronisation census, deterministic mode, speed.py's generation.
# Prints one Markdown table; exit 1 if a check failed. Arguments go to benchmarks/gpu_check.py:
#   benchmarks/gpu_check.sh                 # on a machine with a GPU
#   benchmarks/gpu_check.sh --dry-run       # the same steps on the CPU in float32, smallest sizes (CI)
#   benchmarks/gpu_check.sh --methods lora,poly --keep
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
