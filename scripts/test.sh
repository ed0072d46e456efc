#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh vision) and runs the whole suite,
# the Triton kernels included, on the CPU through TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh vision
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-$PWD/.numba_cache}
TRITON_INTERPRET=1 .venv/bin/python -m pytest -q "$@"
