#!/usr/bin/env bash
# The first accelerator run in one script: ResNet-50's train step (compiled once, the
# persistent compilation cache on), the loader on 500x375 JPEGs from a pipeline started
# after compiling, and configs/catdog.py's time to accuracy on PetImages-180.zip when
# ../shared/data/ or shared/data/ holds it. One JSON line per figure, also appended to
# $OUT/gpu_benchmark.jsonl when $OUT is set. Killed after 8 minutes; the flagship run is
# stopped before that (--budget-s, default 450).
# Usage: bash benchmarks/gpu.sh [--smoke] [flags of jaxcls-benchmark gpu]
#   --smoke: the same code at tiny sizes on a CPU, in under a minute (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Memory on demand: the flagship run is a second process on the same device.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
exec timeout "${JAXCLS_GPU_SCRIPT_TIMEOUT:-480}" "${PYTHON:-python}" -m jaxcls.cli.benchmark gpu "$@"
