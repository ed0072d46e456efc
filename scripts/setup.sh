#!/usr/bin/env bash
# Makes .venv with everything the project needs, on a fresh machine.
#   scripts/setup.sh            torch 2.13.0 (CPU build from local disk) + matplotlib (what the studies need)
#   scripts/setup.sh vision     torch 2.14.1 + torchvision 0.29.1 (the ~5 GB build on local disk), triton, test tools
# Both then build the C++ CPU op against the torch installed (python -m groupnorm.kernels.build: into
# groupnorm/kernels/_build/torch-<version>/, skipped when up to date, so one .venv may switch flavours).
# Also installs the Debian package with the default dataset (Fashion-MNIST) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:-core}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=".venv/bin/python -m pip"
stamp=".venv/.groupnorm-$flavour"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    if [ "$flavour" = vision ]; then
        $PIP install -q "torch==2.14.1" "torchvision==0.29.1"
        $PIP install -q -e ".[all,dev]"
    else
        .venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
        $PIP install -q -e ".[plot]"
    fi
    touch "$stamp"
fi

# The C++ CPU op (the "cpu" backend). torch.utils.cpp_extension needs setuptools and ninja. A failed
# build does not fail setup: the package then runs on the "native" backend, and says so once.
.venv/bin/python -c "import setuptools, ninja" 2>/dev/null || $PIP install -q setuptools ninja
.venv/bin/python -m groupnorm.kernels.build || echo "setup.sh: warning: the C++ CPU op was not built" \
    "(see the line above); Group Norm on the CPU falls back to the 'native' backend" >&2
