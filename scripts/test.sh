#!/usr/bin/env bash
# Sets up .venv, then runs the linter, the formatter check and the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k golden`, or `-n 0` for one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# PyTorch (CPU build), for the converter's .pth tests and the torch references. `==2.13.0`
# also matches the local `+cpu` build (a wheel in pip's find-links); no silent skip: a failed
# install stops here.
.venv/bin/python -m pip install -q "torch==2.13.0" \
  || { echo "error: pip could not install torch==2.13.0 (the .pth tests need it)" >&2; exit 1; }
# Parity data, torch and the ONNX exporter/runtime (setup.sh installs them) are required here: a
# missing golden file, torch, jax2onnx or onnxruntime fails its tests (with the reason) instead of
# skipping them. Set any of these to 0 to allow skips on a laptop.
export BIFORMER_REQUIRE_GOLDEN="${BIFORMER_REQUIRE_GOLDEN:-1}"
export BIFORMER_REQUIRE_TORCH="${BIFORMER_REQUIRE_TORCH:-1}"
export BIFORMER_REQUIRE_ONNX="${BIFORMER_REQUIRE_ONNX:-1}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# One persistent compilation cache for the whole run, shared by the pytest workers and the CLI
# subprocesses they start (several tests compile the same micro programs; a resumed run compiles
# what its first run did). A fresh directory, removed at the end; the size limit turns on jax's
# file lock, so that two processes never read an entry another one is writing.
if [[ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/biformer-jax-test-xla-cache-XXXXXX")"
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0.5}"
export JAX_COMPILATION_CACHE_MAX_SIZE="${JAX_COMPILATION_CACHE_MAX_SIZE:-$((16 * 1024 * 1024 * 1024))}"
# One worker per core, each test file kept on one worker (module fixtures are built once), the
# files handed out heaviest first (tests/conftest.py orders them by tests/file_seconds.json).
.venv/bin/python -m pytest -q -n auto --dist loadfile --no-loadscope-reorder "$@"
