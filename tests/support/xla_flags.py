"""The XLA flags of every test process: the pytest workers (conftest.py) and the CLI subprocesses.

The tests compile hundreds of small programs and run each a few times, so compiling is most of
their time. XLA:CPU's backend at -O0 compiles them in about half the time (DeBiFormer micro's
`init` 23 s -> 11 s, its forward 4.2 s -> 2.9 s, here) at the cost of slower elementwise loops;
it does not enable fast-math either way, and the golden checks pass at both levels.
`BIFORMER_TEST_XLA_OPT=default` keeps XLA's default level (for a run that checks the compiler).
"""

from __future__ import annotations

import os

# `jax.jit(f).lower(...).compile(DEFAULT_BACKEND_LEVEL)`: one program at XLA's default level (3).
DEFAULT_BACKEND_LEVEL = {"xla_backend_optimization_level": 3}


def xla_flags_for(num_devices: int) -> str:
    """`num_devices` simulated CPU devices, and -O0 unless BIFORMER_TEST_XLA_OPT=default."""
    flags = [f"--xla_force_host_platform_device_count={num_devices}"]
    if os.environ.get("BIFORMER_TEST_XLA_OPT", "0") != "default":
        flags.append("--xla_backend_optimization_level=0")
    return " ".join(flags)
