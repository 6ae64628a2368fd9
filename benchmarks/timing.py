"""What the benchmarks share: dtypes by name, a compiled step's timing and memory analysis.

Kept free of the trainer's imports (train_lib pulls in TensorFlow for the input pipeline,
~0.6 GB of resident memory) so that a benchmark reporting peak RSS measures the model.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class CompiledBench:
    """A compiled step: subclasses set `self.compiled` and `self._run` (one step, no blocking)."""

    def step(self) -> None:
        jax.block_until_ready(self._run())

    def memory(self) -> dict:
        try:
            m = self.compiled.memory_analysis()
        except Exception:  # some backends do not implement it
            m = None
        if m is None:
            return {"peak_bytes": None, "temp_bytes": None}
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return {
            "peak_bytes": int(peak),
            "temp_bytes": int(m.temp_size_in_bytes),
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
        }


def time_steps(bench, n: int) -> float:
    """Median seconds per step over n steps."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        bench.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def alternate_rounds(ours, official, *, warmup: int, rounds: int, steps: int, batch: int):
    """Warms both up, then times `rounds` rounds of `steps` steps, ours then the official one
    (None: ours alone) in each, so both see the same load; prints a line per round.

    Returns the per-round median seconds per step: (ours, official; empty without one).
    """
    for _ in range(warmup):
        ours.step()
        if official is not None:
            official.step()
    ours_s, theirs_s = [], []
    for r in range(rounds):
        ours_s.append(time_steps(ours, steps))
        line = f"round {r}: ours {1e3 * ours_s[-1]:.0f} ms/step ({batch / ours_s[-1]:.2f} img/s)"
        if official is not None:
            theirs_s.append(time_steps(official, steps))
            line += (
                f", official {1e3 * theirs_s[-1]:.0f} ms/step ({batch / theirs_s[-1]:.2f} img/s),"
                f" speedup {theirs_s[-1] / ours_s[-1]:.2f}x"
            )
        print(line, flush=True)
    return ours_s, theirs_s
