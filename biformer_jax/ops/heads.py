"""The head layout every routed-attention implementation works in.

Queries and keys/values arrive grouped by region, (N, P, T, C) with the heads' channels
side by side; the implementations compute per head, heads major: (N, P, m, T, c).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(N, P, T, m*c) -> (N, P, m, T, c): heads major, so each head's tokens are contiguous."""
    n, p, t, ch = x.shape
    x = x.reshape(n, p, t, num_heads, ch // num_heads)  # (N, P, T, m, c)
    return x.transpose(0, 1, 3, 2, 4)  # (N, P, m, T, c)


def merge_heads(x: jax.Array) -> jax.Array:
    """(N, P, m, T, c) -> (N, P, T, m*c), the inverse of `split_heads`."""
    n, p, m, t, c = x.shape
    return x.transpose(0, 1, 3, 2, 4).reshape(n, p, t, m * c)  # (N, P, T, m*c)


def split_qkv_heads(q: jax.Array, kv: jax.Array, num_heads: int, scale: float):
    """q (N, P, Tq, Cqk), kv (N, P, Tkv, Cqk+Cv) -> heads-major qh (times scale), kh, vh."""
    cqk = q.shape[-1]
    qh = split_heads(q * scale, num_heads)  # (N, P, m, Tq, c)
    kh = split_heads(kv[..., :cqk], num_heads)  # (N, P, m, Tkv, c)
    vh = split_heads(kv[..., cqk:], num_heads)  # (N, P, m, Tkv, cv)
    return qh, kh, vh


def gather_heads(xh: jax.Array, r_idx: jax.Array) -> jax.Array:
    """xh: (N, P, m, T, c), r_idx: (N, P, K) -> (N, P, m, K, T, c).

    Indexes the region axis directly (its backward is a scatter-add into a tensor of xh's
    size; the official gather from an expanded view allocates P times more), and produces
    the heads-major layout the attention matmuls consume, so no K-fold tensor is transposed.
    """
    n, _, m = xh.shape[:3]
    ni = jnp.arange(n)[:, None, None, None]  # (N, 1, 1, 1)
    mi = jnp.arange(m)[None, None, :, None]  # (1, 1, m, 1)
    ri = r_idx[:, :, None, :]  # (N, P, 1, K)
    return xh.at[ni, ri, mi].get(mode="promise_in_bounds")  # (N, P, m, K, T, c)
