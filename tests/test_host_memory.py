"""Compiling for inference releases the compiler's freed memory and gives the jitted function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import required

from biformer_jax import host_memory


@required.LINUX_ONLY
def test_release_freed_memory_finds_glibc():
    assert host_memory.release_freed_memory() is True


def test_compile_for_inference_is_the_jitted_function():
    fn = jax.jit(lambda a, b, *, scale: jnp.tanh(a @ b) * scale, static_argnames=("scale",))
    a = jax.random.normal(jax.random.key(0), (8, 16))
    b = jax.random.normal(jax.random.key(1), (16, 4))
    compiled = host_memory.compile_for_inference(fn, a, b, scale=3.0)
    np.testing.assert_array_equal(compiled(a, b), fn(a, b, scale=3.0))
    with pytest.raises(TypeError):  # compiled for (8, 16) inputs
        compiled(a[:4], b)
