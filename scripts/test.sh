#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh vision, which also builds the C++ CPU op) and runs
# the whole suite, the Triton kernels included, on the CPU through TRITON_INTERPRET=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh vision
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# The C++ CPU op and the Triton backend (interpreted) must load here: their tests fail, not skip.
export GROUPNORM_REQUIRE_BACKENDS=${GROUPNORM_REQUIRE_BACKENDS:-cpu,triton}
TRITON_INTERPRET=1 .venv/bin/python -m pytest -q "$@"
