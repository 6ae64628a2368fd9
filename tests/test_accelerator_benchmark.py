"""benchmarks/accelerator.py in its CPU smoke mode: every section runs and reports, and it
imports nothing of the training stack (clu, tfds, grain, ml_collections), which the lent
accelerator machines do not have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_benchmark_smoke(tmp_path):
    """About 35-60 s in the suite: one benchmark process that compiles each smoke
    model's train step and forward (Pallas kernels in interpret mode) and writes its JSON."""
    env = {**os.environ, "XLA_FLAGS": xla_flags.xla_flags_for(1)}  # one CPU device, as on a GPU host
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--smoke", f"--out={tmp_path}"]
    cmd += ["--impls=pallas", "--steps=1", "--compile_threads=2", "--budget_s=100000"]  # no budget on CI
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "accelerator.json").read_text())
    assert result["forbidden_modules_loaded"] == []
    assert result["peak_tflop_per_s"] > 0
    assert result["kernel_check"] and all(r["ok"] for r in result["kernel_check"])
    assert {r["stage"] for r in result["stages"]} == {"s1", "s2"}
    assert all(r["fastest"] in ("gather", "pallas") and r["pallas_ms"] > 0 for r in result["stages"])
    timed = {(r["impl"], r["mode"]): r for r in result["models"]}
    assert set(timed) == {("pallas", "train"), ("pallas", "infer")}
    assert all(r["img_per_s"] > 0 and 0 < r["mfu"] for r in timed.values())
    assert result["official"] == [{"skipped": "no --official_repo"}]
    table = (tmp_path / "accelerator.md").read_text()
    assert "| pallas | train | 2 |" in table and "MFU" in table
