#!/usr/bin/env bash
# Install the library core ALONE into a fresh venv (default .venv-core): the package with --no-deps
# beside only torch, torch-pruning, POT, numpy, scipy and pytest, as a project with its own torch would.
# TORCH picks the torch requirement (default: the CPU-only 2.13.0 wheel on this machine's disk).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-core}
TORCH=${TORCH:-torch==2.13.0+cpu}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH" torch-pruning pot numpy scipy pytest
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps .
