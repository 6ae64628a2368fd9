#!/usr/bin/env bash
# Sets up .venv, then runs the linter, the formatter check and the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k golden`, or `-n 0` for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Optional: PyTorch's CPU build, for the converter's .pth tests; they skip, with the
# reason, where it can't be installed.
.venv/bin/python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
  || echo "note: torch==2.13.0+cpu is not installable here; torch tests will be skipped"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# One worker per core, each test file kept on one worker (module fixtures are built once).
.venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
