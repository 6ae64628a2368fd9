"""CI cannot pass with the parity data, torch or the ONNX packages missing (issue 16 item 8, issue 25 item 6).

Runs pytest on a golden test with an empty BIFORMER_GOLDEN_DIR, on the .pth converter tests with
torch hidden and on an ONNX test with jax2onnx hidden: they skip (with the reason) on a laptop,
and fail under BIFORMER_REQUIRE_GOLDEN=1 / BIFORMER_REQUIRE_TORCH=1 / BIFORMER_REQUIRE_ONNX=1,
which scripts/test.sh (CI) sets. And no test may skip except through tests/support/required.py:
the suite is scanned for every other skip site.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pytest(args, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIFORMER_REQUIRE_")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rfEs", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("require", ["0", "1"])
def test_missing_golden_data_fails_only_where_required(tmp_path, require):
    empty = tmp_path / "golden"
    empty.mkdir()
    proc = _pytest(
        # opts_a (unrolled) and the training case unrolled and scanned: 3 tests.
        ["tests/test_golden_biformer.py", "-k", "opts_a or train_gradients"],
        {"BIFORMER_GOLDEN_DIR": str(empty), "BIFORMER_REQUIRE_GOLDEN": require},
        tmp_path,
    )
    reason = f"golden file opts_a.npz not found under {empty}"
    assert reason in proc.stdout, proc.stdout[-3000:]
    if require == "1":
        assert proc.returncode == 1 and "3 failed" in proc.stdout, proc.stdout[-3000:]
        assert "BIFORMER_REQUIRE_GOLDEN=1" in proc.stdout
    else:
        assert proc.returncode == 0 and "3 skipped" in proc.stdout, proc.stdout[-3000:]


def test_scripts_test_sh_requires_golden_data_and_torch():
    text = (ROOT / "scripts" / "test.sh").read_text()
    assert 'export BIFORMER_REQUIRE_GOLDEN="${BIFORMER_REQUIRE_GOLDEN:-1}"' in text
    assert 'export BIFORMER_REQUIRE_TORCH="${BIFORMER_REQUIRE_TORCH:-1}"' in text
    assert 'export BIFORMER_REQUIRE_ONNX="${BIFORMER_REQUIRE_ONNX:-1}"' in text
    assert 'pip install -q "torch==2.13.0"' in text and "2>/dev/null" not in text
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def _hiding(tmp_path, module: str) -> str:
    """A PYTHONPATH entry whose sitecustomize makes `import <module>` fail (an environment without it)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r} or name.startswith({module + '.'!r}):\n"
        f"            raise ModuleNotFoundError('No module named {module}')\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    return os.pathsep.join([str(hide), str(ROOT)])


@pytest.mark.parametrize("require", ["0", "1"])
def test_missing_torch_fails_the_converter_tests_only_where_required(tmp_path, require):
    proc = _pytest(
        ["tests/test_convert_cli.py"],
        {"PYTHONPATH": _hiding(tmp_path, "torch"), "BIFORMER_REQUIRE_TORCH": require},
        tmp_path,
    )
    assert "PyTorch is not installed: the .pth command line needs it" in proc.stdout, proc.stdout[-3000:]
    if require == "1":
        assert proc.returncode != 0 and "BIFORMER_REQUIRE_TORCH=1" in proc.stdout, proc.stdout[-3000:]
    else:
        # Skipped (status 5: the whole module skipped, nothing else collected), not failed.
        assert proc.returncode in (0, 5) and "1 skipped" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("require", ["0", "1"])
def test_missing_jax2onnx_fails_the_onnx_tests_only_where_required(tmp_path, require):
    # A `pip install --no-deps` that lost jax2onnx: onnxruntime is there, the exporter is not.
    proc = _pytest(
        ["tests/test_export_symbolic.py", "-k", "to_onnx"],
        {"PYTHONPATH": _hiding(tmp_path, "jax2onnx"), "BIFORMER_REQUIRE_ONNX": require},
        tmp_path,
    )
    assert "jax2onnx is not installed (scripts/setup.sh installs" in proc.stdout, proc.stdout[-3000:]
    if require == "1":
        assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout[-3000:]
        assert "BIFORMER_REQUIRE_ONNX=1" in proc.stdout
    else:
        assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout[-3000:]


# --- no skip outside the gate ---------------------------------------------------------------

GATE = ROOT / "tests" / "support" / "required.py"
# pytest.skip / importorskip / mark.skip / mark.skipif / xfail, unittest's skip decorators and
# SkipTest, under any spelling (`pytest.mark.skipif`, `from pytest import importorskip`, ...).
SKIP_NAMES = {"skip", "skipif", "importorskip", "xfail", "skipTest", "SkipTest", "skipIf", "skipUnless"}


def skip_sites(source: str, filename: str) -> list[str]:
    """`file:line: name` of every reference to a skip function, decorator or exception in `source`."""
    sites = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and node.attr in SKIP_NAMES:
            sites.append(f"{filename}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in SKIP_NAMES:
            sites.append(f"{filename}:{node.lineno}: {node.id}")
        elif isinstance(node, ast.alias) and node.name.split(".")[-1] in SKIP_NAMES:
            sites.append(f"{filename}:{node.lineno}: import {node.name}")
    return sites


def test_the_scan_finds_every_kind_of_skip():
    source = (
        "import pytest, unittest\n"
        "from pytest import importorskip\n"
        "torch = pytest.importorskip('torch')\n"
        "@pytest.mark.skipif(True, reason='x')\n"
        "def test_a():\n"
        "    pytest.skip('no data')\n"
        "@unittest.skip('x')\n"
        "def test_b():\n"
        "    raise unittest.SkipTest('x')\n"
        "pytestmark = pytest.mark.xfail\n"
    )
    lines = sorted(int(site.split(":")[1]) for site in skip_sites(source, "t.py"))
    assert lines == [2, 3, 4, 6, 7, 9, 10], skip_sites(source, "t.py")
    assert skip_sites("def test_c():\n    assert 'skip' in 'skipped'\n", "t.py") == []


def test_no_test_skips_outside_the_gate():
    """Every skip goes through tests/support/required.py, whose BIFORMER_REQUIRE_* switches CI sets."""
    files = sorted(p for p in (ROOT / "tests").rglob("*.py") if p != GATE)
    assert len(files) > 40  # the scan sees the suite
    sites = [s for p in files for s in skip_sites(p.read_text(), str(p.relative_to(ROOT)))]
    assert sites == [], (
        "skip sites outside tests/support/required.py (a missing input must skip through required.missing / "
        "required.torch / required.onnxruntime / golden.require, so that CI's BIFORMER_REQUIRE_* turn it into "
        "a failure):\n  " + "\n  ".join(sites)
    )
