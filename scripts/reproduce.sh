#!/usr/bin/env bash
# Installs what it needs, then runs the quick preset of the paper's batch-size study
# (BN vs GN at 32 and 2 images per worker, 8 simulated workers) on Fashion-MNIST and writes the report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-results/batch-quick}
.venv/bin/groupnorm study batch --preset quick --out "$out"
.venv/bin/groupnorm report "$out"
echo "report: $out/REPORT.md"
