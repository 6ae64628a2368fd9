"""Running train.py (through tests/support/train_harness.py) as subprocesses: flags, env, waiting, cleanup.

Every run trains the quickstart's micro BiFormer on digits at 32x32, 6 steps of 16 images
(`train_flags`: the tests' micro run as flags), checkpoints every 2 steps, logs every step.
The subprocesses share one XLA compilation cache per test session, so only the first run of
each program pays for compiling it; every program is cached, however quick to compile (no
minimum compile time: small programs add up over the launches). (JAX writes that cache from
process 0 only: process 1 of a two-process run compiles its programs on every launch.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from biformer_jax.training import metrics as metrics_lib
from support import train_testlib, xla_flags

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "tests" / "support" / "train_harness.py"
NUM_STEPS = 6
RUN_TIMEOUT_S = 1500  # generous: compiles on a loaded 2-core machine take minutes

# BIFORMER_JAX_TEST_XLA_CACHE: reuse a cache across sessions (e.g. while developing a test);
# JAX_COMPILATION_CACHE_DIR: the run's own (scripts/test.sh sets one for every process).
_CACHE_DIR = (
    os.environ.get("BIFORMER_JAX_TEST_XLA_CACHE")
    or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    or tempfile.mkdtemp(prefix="biformer-jax-subprocess-xla-cache-")
)


def train_flags(workdir, **overrides) -> list[str]:
    """train.py flags: the quickstart's small run (`:runlocal`) with train_testlib.MICRO's changes."""
    config = {
        **train_testlib.MICRO,
        "num_train_steps": NUM_STEPS,
        "steps_per_epoch": 3,
        "eval_every_steps": 1000,  # only after the last step
        "checkpoint.keep": 3,
        **overrides,
    }
    return [
        f"--config={ROOT / 'configs' / 'quickstart.py'}:runlocal",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in config.items()),
    ]


def env(num_devices: int, **extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out.update(
        XLA_FLAGS=xla_flags.xla_flags_for(num_devices),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(ROOT) + os.pathsep + out.get("PYTHONPATH", ""),
    )
    out.update(extra)
    return out


def start(args: list[str], env_vars: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115  (closed by the child's exit; kept for the failure message)
    return subprocess.Popen(
        [sys.executable, str(HARNESS), *args], env=env_vars, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
    )


def run(args: list[str], env_vars: dict[str, str], log_path: Path) -> None:
    """Runs to completion; fails with the log's tail unless the exit status is 0."""
    proc = start(args, env_vars, log_path)
    try:
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        kill(proc)
    assert code == 0, f"exit status {code}:\n{tail(log_path)}"


def wait_for(path: Path, proc: subprocess.Popen, log_path: Path, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {path.name}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path.name}:\n{tail(log_path)}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL if still running (our own child, by pid), and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def tail(log_path: Path, n: int = 60) -> str:
    try:
        return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def losses(workdir) -> dict[int, float]:
    """step -> train loss (a resumed run's re-logged steps: the last line wins)."""
    records = metrics_lib.read_jsonl(Path(workdir) / metrics_lib.METRICS_FILE)
    return {step: r["train/loss"] for step, r in records.items() if "train/loss" in r}


def checkpoint_steps(workdir) -> list[int]:
    ckpt = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []
