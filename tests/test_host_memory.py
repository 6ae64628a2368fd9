"""Compiling for inference releases the compiler's freed memory and gives the jitted function."""

import ctypes
import ctypes.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import required

from biformer_jax import host_memory


@required.LINUX_ONLY
def test_release_freed_memory_returns_freed_heap_pages_to_the_system():
    """64 MiB of small heap blocks, written, then freed below a block still in use (so the heap
    cannot shrink from its top by itself): resident memory stays up until release_freed_memory."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 1024, 64 * 1024  # 1 KiB blocks: far below malloc's mmap threshold
    blocks = [libc.malloc(size) for _ in range(count)]
    keep = libc.malloc(size)  # above them
    for block in blocks:
        ctypes.memset(block, 1, size)  # resident
    for block in blocks:
        libc.free(block)
    before = host_memory.resident_bytes()
    assert host_memory.release_freed_memory() is True
    after = host_memory.resident_bytes()
    libc.free(keep)
    assert before - after > 32 * 2**20, f"RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB"


def test_compile_for_inference_is_the_jitted_function():
    fn = jax.jit(lambda a, b, *, scale: jnp.tanh(a @ b) * scale, static_argnames=("scale",))
    a = jax.random.normal(jax.random.key(0), (8, 16))
    b = jax.random.normal(jax.random.key(1), (16, 4))
    compiled = host_memory.compile_for_inference(fn, a, b, scale=3.0)
    np.testing.assert_array_equal(compiled(a, b), fn(a, b, scale=3.0))
    with pytest.raises(TypeError):  # compiled for (8, 16) inputs
        compiled(a[:4], b)
