"""benchmarks/dot_bound.py reads every dot of a compiled program, with its shapes and FLOPs."""

from __future__ import annotations

import dot_bound
import jax
import jax.numpy as jnp


def test_dot_bound_finds_every_dot_of_a_compiled_program():
    def f(a, b, w):
        h = jax.nn.gelu(jnp.einsum("bij,bjk->bik", a, b))  # batched: 4 x (32x48 . 48x64)
        return jnp.tanh(h.reshape(-1, 64) @ w).sum()  # (128x64 . 64x16), fused with tanh

    args = (jnp.ones((4, 32, 48)), jnp.ones((4, 48, 64)), jnp.ones((64, 16)))
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    dots = dot_bound.program_dots(text)
    # Forward 2 dots; backward: 2 for the batched einsum's inputs, 1 for x and 1 for w of the matmul.
    assert sum(dots.values()) == 6, dots
    flops = sum(n * dot_bound.dot_flops(key) for key, n in dots.items())
    assert flops == 3 * (2 * 4 * 32 * 48 * 64 + 2 * 128 * 64 * 16)
    key = next(iter(dots))
    assert dot_bound.time_dot(key, repeats=1) > 0
