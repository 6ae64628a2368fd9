"""Test inputs that may be absent on a laptop but never in CI: the golden data, PyTorch, ONNX.

Without them a test skips, saying what is missing; under BIFORMER_REQUIRE_GOLDEN=1 /
BIFORMER_REQUIRE_TORCH=1 / BIFORMER_REQUIRE_ONNX=1 (set by scripts/test.sh, which CI runs) it
fails instead, so a CI machine without `../shared/golden`, torch or jax2onnx + onnxruntime cannot
pass with those tests skipped. This module is the only place a test may skip:
tests/test_required_inputs.py scans the suite for skip sites anywhere else.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest

GOLDEN_ENV = "BIFORMER_REQUIRE_GOLDEN"
TORCH_ENV = "BIFORMER_REQUIRE_TORCH"
ONNX_ENV = "BIFORMER_REQUIRE_ONNX"

# Not a missing input but the platform: glibc's malloc_trim exists on Linux only (CI is Linux).
LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")


def _required(env: str) -> bool:
    return os.environ.get(env, "0").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str, env: str) -> None:
    """Skips the test with `reason`, or fails it with that reason when `env` requires the input."""
    if _required(env):
        pytest.fail(f"{reason} ({env}=1: this input is required here, not optional)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)  # also from a module-level import


def _module(name: str, reason: str, env: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(reason, env)
        raise  # not reached: missing() raises


def torch(reason: str = "PyTorch is not installed") -> ModuleType:
    """`import torch`, or skip / fail (BIFORMER_REQUIRE_TORCH=1) with `reason`."""
    return _module("torch", f"{reason}; install it with `pip install torch==2.13.0`", TORCH_ENV)


def onnxruntime() -> ModuleType:
    """`import onnxruntime` after checking jax2onnx imports, or skip / fail (BIFORMER_REQUIRE_ONNX=1)."""
    for name in ("jax2onnx", "onnxruntime"):
        _module(
            name,
            f"{name} is not installed (scripts/setup.sh installs requirements-onnx.txt, with --no-deps)",
            ONNX_ENV,
        )
    return importlib.import_module("onnxruntime")
