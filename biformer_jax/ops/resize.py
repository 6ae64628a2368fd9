"""PyTorch's `F.interpolate` (bilinear, align_corners=False; nearest) and
`nn.AdaptiveAvgPool2d` on NHWC maps, index for index.

Why not `jax.image.resize`: it antialiases when it downsamples (PyTorch's bilinear does not)
and places its samples by its own convention; mmsegmentation's heads resize with PyTorch's
arithmetic, which a port held to their outputs must repeat. Every index and weight here is
computed once, in float32 numpy, from the static sizes, as PyTorch's CPU kernels compute
them (`area_pixel_compute_source_index`, `nearest_idx`, the adaptive pooling bins); the
map itself is then two gathers and a lerp per axis, which XLA fuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _check_size(x: jax.Array, size: Sequence[int], what: str) -> tuple[int, int]:
    if x.ndim != 4:
        raise ValueError(f"{what} takes an NHWC map, got shape {x.shape}.")
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"{what}: output size must be positive, got {tuple(size)}.")
    return h, w


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1) of PyTorch's linear interpolation with align_corners=False.

    out[j] = w0[j] * in[i0[j]] + w1[j] * in[i1[j]]; the source coordinate is
    (j + 0.5) * in/out - 0.5 clamped at 0, all in float32 as PyTorch's CPU kernel has it.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # floor, src >= 0
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, w0, w1


def nearest_taps(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's legacy 'nearest' source index: min(floor(j * in/out), in - 1) in float32."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def _lerp_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    in_size = x.shape[axis]
    if in_size == out_size:
        return x  # PyTorch copies the input when the size is unchanged
    i0, i1, w0, w1 = linear_taps(in_size, out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    w0 = jnp.asarray(w0.reshape(shape), x.dtype)  # broadcast along `axis`
    w1 = jnp.asarray(w1.reshape(shape), x.dtype)
    return w0 * jnp.take(x, jnp.asarray(i0), axis=axis) + w1 * jnp.take(x, jnp.asarray(i1), axis=axis)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` (no antialiasing) on NHWC x.

    mmsegmentation's `resize` and `Upsample` with align_corners=False are this function.
    """
    h, w = _check_size(x, size, "resize_bilinear")
    return _lerp_axis(_lerp_axis(x, 1, h), 2, w)


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """`F.interpolate(x, size, mode="nearest")` on NHWC x (the FPN neck's top-down resize)."""
    h, w = _check_size(x, size, "resize_nearest")
    x = x if x.shape[1] == h else jnp.take(x, jnp.asarray(nearest_taps(x.shape[1], h)), axis=1)
    return x if x.shape[2] == w else jnp.take(x, jnp.asarray(nearest_taps(x.shape[2], w)), axis=2)


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging matrix of PyTorch's adaptive pooling bins.

    Bin i covers [floor(i * in / out), ceil((i + 1) * in / out)): bins overlap when out does
    not divide in, as in `nn.AdaptiveAvgPool2d`.
    """
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m.astype(np.float32)


def adaptive_avg_pool(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """`nn.AdaptiveAvgPool2d(size)` on NHWC x; a bin's mean is separable, so two small matmuls."""
    h, w = _check_size(x, size, "adaptive_avg_pool")
    ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], h))
    pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], w))
    y = jnp.einsum("oh,nhwc->nowc", ph, x.astype(jnp.float32), precision="highest")  # (N, h, W, C)
    y = jnp.einsum("pw,nowc->nopc", pw, y, precision="highest")  # (N, h, w, C)
    return y.astype(x.dtype)


__all__ = [
    "adaptive_avg_pool",
    "adaptive_pool_matrix",
    "linear_taps",
    "nearest_taps",
    "resize_bilinear",
    "resize_nearest",
]
