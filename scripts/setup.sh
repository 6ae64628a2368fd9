#!/usr/bin/env bash
# Creates .venv (if missing) and installs requirements.txt and this package into it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# ONNX export: pinned, without dependency resolution (requirements-onnx.txt says why).
.venv/bin/python -m pip install -q --no-deps -r requirements-onnx.txt
.venv/bin/python -m pip install -q --no-deps -e .
