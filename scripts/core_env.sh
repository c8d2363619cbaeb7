#!/usr/bin/env bash
# Install the library core ALONE into a fresh venv (default .venv-core): the package with --no-deps
# beside only torch, torch-pruning, POT, numpy, scipy and pytest, as a project with its own torch would,
# at the OLDEST versions pyproject.toml allows that could be tested here (torch: the CPU-only 2.13.0
# wheel on this machine's disk; older torch wheels are not available offline). CORE_REQUIREMENTS
# overrides the list, e.g. CORE_REQUIREMENTS="torch==2.13.0+cpu torch-pruning pot numpy scipy".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-core}
CORE_REQUIREMENTS=${CORE_REQUIREMENTS:-"torch==2.13.0+cpu torch-pruning==1.6.0 pot==0.9.0 numpy==1.26.4 scipy==1.11.4"}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086  # the list is split on purpose
"$VENV/bin/python" -m pip install -q --disable-pip-version-check $CORE_REQUIREMENTS pytest
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps .
