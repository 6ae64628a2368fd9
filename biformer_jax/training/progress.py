"""Progress reports of the training loop: steps/s, ETA and the share of time in eval.

What clu's `periodic_actions.ReportProgress` reports (clu imports TensorFlow with it): after
the first call, every 60 s and at the last step, a log line "Setting work unit notes: 2.5
steps/s, 40.0% (400/1000), ETA: 4m (1m : 12.0% eval)" and the scalars `steps_per_sec` and
`uptime` (seconds since the reporter was made) to the writer.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Optional

from absl import logging

from biformer_jax.training.writers import MetricWriter


def format_secs(secs: float) -> str:
    """123456.7 -> '1d10h17m' (minutes always shown)."""
    days, secs = divmod(int(secs), 24 * 3600)
    hours, secs = divmod(secs, 3600)
    return (f"{days}d" if days else "") + (f"{hours}h" if hours else "") + f"{secs // 60}m"


class ReportProgress:
    def __init__(self, *, num_train_steps: int, writer: Optional[MetricWriter] = None, every_secs: float = 60.0):
        self.num_train_steps, self.writer, self.every_secs = num_train_steps, writer, every_secs
        self._time_per_part: dict[str, float] = collections.defaultdict(float)
        self._t0 = time.monotonic()
        self._previous: Optional[tuple[int, float]] = None  # (step, time) of the last report

    def __call__(self, step: int, t: Optional[float] = None) -> bool:
        """Called after every step; True where it reported (never on the first call)."""
        t = time.monotonic() if t is None else t
        if self._previous is None:
            self._previous = (step, t)
            return False
        previous_step, previous_t = self._previous
        if step == previous_step or not (t - previous_t > self.every_secs or step == self.num_train_steps):
            return False
        steps_per_sec = (step - previous_step) / (t - previous_t)
        message = f"{steps_per_sec:.1f} steps/s"
        if self.num_train_steps > 0:
            n, eta = self.num_train_steps, (self.num_train_steps - step) / steps_per_sec
            message += f", {100 * step / n:.1f}% ({step}/{n}), ETA: {format_secs(eta)}"
        if self._time_per_part:
            total = time.monotonic() - self._t0
            parts = ", ".join(f"{100 * dt / total:.1f}% {name}" for name, dt in sorted(self._time_per_part.items()))
            message += f" ({format_secs(total)} : {parts})"
        logging.info("Setting work unit notes: %s", message)
        if self.writer is not None:
            self.writer.write_scalars(step, {"steps_per_sec": steps_per_sec})
            self.writer.write_scalars(step, {"uptime": time.monotonic() - self._t0})
        self._previous = (step, t)
        return True

    @contextlib.contextmanager
    def timed(self, name: str):
        """Counts the wall time of the block as `name` (the block must wait for its results, as
        the trainer's evaluation does: it reads its metrics back)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self._time_per_part[name] += time.monotonic() - start
