"""Preemption: on SIGTERM (the TPU / SLURM notice) finish the step, save, wait, exit with status 0.

`Watcher.reached(step)` is asked after every step. In a single process a Python SIGTERM handler
sets a flag. With several processes (jax.distributed) every process must stop after the same
step, so the question goes to JAX's preemption sync service, whose own SIGTERM notifier (installed
by `jax.distributed.initialize`) tells all processes to stop at one agreed step; no Python handler
is installed then, as it would replace that notifier.

`Preempted` is a `SystemExit` with status 0: raised by the train loop after the checkpoint is
written, it ends train.py cleanly (a scheduler sees a normal exit), and re-running the same
command resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(SystemExit):
    """The run stopped on a preemption notice after saving checkpoint `step`; exit status 0."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step

    def __str__(self) -> str:
        return f"Preempted: saved the checkpoint of step {self.step}; run the same command to resume."


class Watcher:
    """Turns SIGTERM into a stop at a step boundary (a context manager: restores the old handler)."""

    def __init__(self):
        self._requested = threading.Event()
        self._previous = None
        self._installed = False
        self._multiprocess = jax.process_count() > 1

    def __enter__(self) -> Watcher:
        # signal.signal only works in the main thread; elsewhere (e.g. a sweep run in a thread)
        # preemption is simply not watched.
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        # Only set a flag: the step under way finishes, the loop saves at its boundary.
        self._requested.set()

    def request(self) -> None:
        """Asks for a stop as SIGTERM would (for tests and callers with their own notice)."""
        self._requested.set()

    def reached(self, step: int) -> bool:
        """True once the run should save and stop after `step` (the same step on every process)."""
        if self._multiprocess:
            if multihost_utils.reached_preemption_sync_point(step):
                self._requested.set()
            return self._requested.is_set()
        if self._requested.is_set():
            logging.warning("Preemption notice (SIGTERM): stopping after step %d.", step)
            return True
        return False
