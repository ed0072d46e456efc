#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh vision, which also builds the C++ CPU op) and runs
# the whole suite, the Triton kernels included, on the CPU through TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh vision
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# The C++ CPU op must be built and load here (tests/kernels/test_cpu.py fails otherwise).
export GROUPNORM_REQUIRE_EXT=${GROUPNORM_REQUIRE_EXT:-1}
TRITON_INTERPRET=1 .venv/bin/python -m pytest -q "$@"
