"""train.py with test hooks, run as a subprocess by the preemption and multi-process tests.

    python tests/support/train_harness.py <train.py flags>

Behaves exactly as train.py (with the test workers' garbage-collector thresholds), plus two
hooks set by environment variables (both write a marker file the test waits for, so the test
acts at a known point instead of guessing with sleeps):

* HARNESS_PAUSE_AFTER_STEP=N: once step N is done the input iterator writes
  $HARNESS_MARKER and waits (up to 120 s) until a SIGTERM has reached train.py's handler, so
  the test's external SIGTERM arrives mid-run, with more steps to go (several processes: it
  waits HARNESS_PAUSE_SECONDS, default 10, for JAX's notifier instead).
* HARNESS_HANG_SAVE_STEP=N: the save of checkpoint N writes everything into Orbax's temporary
  directory, then writes $HARNESS_MARKER and hangs before the atomic rename that commits it, so
  the test's `kill -9` lands in the middle of that save.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _mark() -> None:
    Path(os.environ["HARNESS_MARKER"]).write_text(str(os.getpid()))


def _install_pause(step: int) -> None:
    import jax

    from biformer_jax import data
    from biformer_jax.training import preemption

    received = threading.Event()
    on_sigterm = preemption.Watcher._on_sigterm

    def noting(self, signum, frame):
        on_sigterm(self, signum, frame)
        received.set()

    preemption.Watcher._on_sigterm = noting
    real_iterator = data.train_iterator

    def pausing(*args, start_step, **kwargs):
        for i, batch in enumerate(real_iterator(*args, start_step=start_step, **kwargs)):
            if start_step + i == step:  # batch i is step start_step + i + 1: step N is done
                _mark()
                if jax.process_count() > 1:
                    # No Python handler here (JAX's notifier takes SIGTERM): give the notice time
                    # to reach the coordination service; the stop step is agreed there.
                    time.sleep(float(os.environ.get("HARNESS_PAUSE_SECONDS", "10")))
                deadline = time.monotonic() + 120
                while not received.is_set() and time.monotonic() < deadline and jax.process_count() == 1:
                    time.sleep(0.02)
            yield batch

    data.train_iterator = pausing


def _install_hang(step: int) -> None:
    from orbax.checkpoint._src.path import atomicity

    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def hanging(self, *args, **kwargs):
        if self._final_path.name == str(step):
            _mark()
            await asyncio.sleep(3600)
        return await real_finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = hanging


if __name__ == "__main__":
    # The collector's thresholds of the test workers (tests/conftest.py): tracing allocates
    # millions of short-lived objects. A micro run on a warm compilation cache took 11.7 s of CPU
    # against 12.5 s at Python's defaults (three pairs of runs, 2-core machine). Nothing else moves.
    gc.set_threshold(50_000, 20, 20)
    if os.environ.get("HARNESS_PAUSE_AFTER_STEP"):
        _install_pause(int(os.environ["HARNESS_PAUSE_AFTER_STEP"]))
    if os.environ.get("HARNESS_HANG_SAVE_STEP"):
        _install_hang(int(os.environ["HARNESS_HANG_SAVE_STEP"]))
    sys.argv[0] = str(ROOT / "train.py")
    import runpy

    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
