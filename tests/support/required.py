"""Test inputs that may be absent on a laptop but never in CI: the golden data and PyTorch.

Without them a test skips, saying what is missing; under BIFORMER_REQUIRE_GOLDEN=1 /
BIFORMER_REQUIRE_TORCH=1 (set by scripts/test.sh, which CI runs) it fails instead, so a CI
machine without `../shared/golden` or torch cannot pass with the parity tests skipped.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

GOLDEN_ENV = "BIFORMER_REQUIRE_GOLDEN"
TORCH_ENV = "BIFORMER_REQUIRE_TORCH"


def _required(env: str) -> bool:
    return os.environ.get(env, "0").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str, env: str) -> None:
    """Skips the test with `reason`, or fails it with that reason when `env` requires the input."""
    if _required(env):
        pytest.fail(f"{reason} ({env}=1: this input is required here, not optional)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)  # also from a module-level import


def torch(reason: str = "PyTorch is not installed") -> ModuleType:
    """`import torch`, or skip / fail (BIFORMER_REQUIRE_TORCH=1) with `reason`."""
    try:
        return importlib.import_module("torch")
    except ImportError:
        missing(f"{reason}; install it with `pip install torch==2.13.0`", TORCH_ENV)
        raise  # not reached: missing() raises
