#!/usr/bin/env bash
# Create .venv and install the project. torch is installed FIRST (2.13.0, pinned) and only when the
# environment has none, so a machine with its own torch build (CPU or CUDA) keeps it and the project's
# torch range never pulls another one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
