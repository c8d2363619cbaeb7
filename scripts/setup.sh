#!/usr/bin/env bash
# Create .venv with Python 3.11 and install this project, its experiment harness and the test tools at
# the exact versions behind the documented numbers (scripts/constraints.txt). Offline-safe: torch and
# torchvision come from the wheels on disk, the rest from the package registry or its cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c scripts/constraints.txt -e ".[experiments,onnx,test]"
