"""Dense 2-D convolution as im2col + one matmul (XLA:CPU runs it, and its filter gradient,
faster than its own convolution)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve_conv_impl(impl: str) -> str:
    """'auto' picks im2col + matmul on CPU (XLA:CPU's convolution and its filter gradient
    are slower than one matmul over the kh*kw*C patch columns), XLA's convolution elsewhere."""
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "conv"
    if impl not in ("conv", "im2col"):
        raise ValueError(f"conv impl={impl!r} is not one of 'auto', 'conv', 'im2col'.")
    return impl


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Convolution as one matmul over patch columns. x: (N, H, W, Cin), kernel: (kh, kw, Cin, Cout)."""
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    out_h, out_w = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = [
        xp[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]  # kh*kw of (N, H', W', Cin), in the (i, j, cin) order of kernel.reshape
    patches = jnp.concatenate(cols, axis=-1)  # (N, H', W', kh*kw*Cin)
    return jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(kh * kw * cin, cout))  # (N, H', W', Cout)
