"""The XLA flags of every test process: the pytest workers (conftest.py) and the CLI subprocesses.

The tests compile hundreds of small programs and run each a few times, so compiling is most of
their time. XLA:CPU's backend at -O0 compiles them in about half the time (DeBiFormer micro's
`init` 23 s -> 11 s, its forward 4.2 s -> 2.9 s, here) at the cost of slower elementwise loops;
it does not enable fast-math either way, and the golden checks pass at both levels.

XLA:CPU's legacy elemental emitters instead of its new (MLIR) fusion emitters halve the compile
again for most programs: process CPU of `.lower().compile()` at -O0, 2-core machine, two runs
each (scratch probe): BiFormer micro train-mode gradient 11.2 / 8.4 s -> 4.5 / 3.9 s, its forward
3.1 / 2.2 -> 1.1 / 1.0 s, DeBiFormer micro's gradient 36.5 / 36.9 -> 21.9 / 22.2 s, BiFormer-T's
224 forward 3.9 / 3.6 -> 3.1 / 2.3 s; the compiled programs ran as fast (within the probe's
noise). Neither enables fast-math, and the float32 checks pass under both; but float64 training
gradients differ between them by up to ~2e-7 of the largest (test_scan_training's
`with_fusion_emitters`), so a check of float64 exactness compiles with FUSION_EMITTERS.

`BIFORMER_TEST_XLA_OPT=default` keeps XLA's defaults, both of them (for a run that checks the compiler).
"""

from __future__ import annotations

import os

# `jax.jit(f).lower(...).compile(FUSION_EMITTERS)`: one program at -O0 with XLA:CPU's default
# (fusion) emitters; `DEFAULT_BACKEND_LEVEL`: with XLA's defaults altogether (level 3 too).
FUSION_EMITTERS = {"xla_cpu_use_fusion_emitters": True}
DEFAULT_BACKEND_LEVEL = {"xla_backend_optimization_level": 3, **FUSION_EMITTERS}


def xla_flags_for(num_devices: int) -> str:
    """`num_devices` simulated CPU devices, and -O0 with the legacy emitters unless
    BIFORMER_TEST_XLA_OPT=default."""
    flags = [f"--xla_force_host_platform_device_count={num_devices}"]
    if os.environ.get("BIFORMER_TEST_XLA_OPT", "0") != "default":
        flags += ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]
    return " ".join(flags)
