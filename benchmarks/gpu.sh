#!/usr/bin/env bash
# ResNet-50, 224 px, bfloat16 on one GPU: synthetic and real-loader images/sec as JSON.
# Usage: bash benchmarks/gpu.sh [extra args for jaxcls-benchmark gpu]
# Finishes in under 5 minutes (timeout enforced); needs jax with a CUDA plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-true}"
exec timeout 290 "${PYTHON:-python}" -m jaxcls.cli.benchmark gpu "$@"
