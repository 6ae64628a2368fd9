"""Compile for inference, then give the compiler's freed memory back to the operating system.

XLA's compiler allocates a few hundred MB while it compiles a full-size model (about 0.25 GB
for BiFormer-S at 512 x 2048) and frees it when done, but glibc's malloc keeps freed pages in
its arenas, so the process's resident memory stays that much higher while the program runs.
`malloc_trim(0)` returns those pages; inference compiles once per input shape, so this costs
nothing per call. On a C library without it (macOS, musl) the memory stays mapped, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any

import jax


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # no libc by that name, or not glibc
        return None


def resident_bytes() -> int:
    """This process's resident memory now, in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> bool:
    """Returns the C heap's free pages to the system (glibc `malloc_trim(0)`); False if unavailable."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def compile_for_inference(jitted: Any, *args: Any, **kwargs: Any) -> jax.stages.Compiled:
    """`jitted.lower(*args, **kwargs).compile()`, then `release_freed_memory()`.

    The returned executable takes the non-static arguments (static ones are baked in).
    """
    compiled = jitted.lower(*args, **kwargs).compile()
    release_freed_memory()
    return compiled
