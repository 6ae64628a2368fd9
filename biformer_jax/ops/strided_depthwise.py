"""Strided depthwise convolution, `nn.Conv2d(C, C, k, stride=s, padding=p, groups=C)` on NHWC.

DeBiFormer's offset network (a k x k conv with stride `stride_def`, e.g. 9x9 / 8) and its
strided LePE need it. Two implementations of the same function: XLA's grouped convolution
('conv'), and a sum over kernel blocks of unstrided slices ('shift'), which XLA:CPU
compiles and runs far faster than its grouped convolution (as for the stride-1 case in
`ops.depthwise.depthwise_conv`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def strided_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: int, stride: int, impl: str) -> jax.Array:
    """x: (N, H, W, C); kernel: (kh, kw, 1, C); impl 'conv' or 'shift' -> (N, H', W', C),
    H' = (H + 2 padding - kh) // stride + 1 (likewise W')."""
    if impl == "conv":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    if impl != "shift":
        raise ValueError(f"strided depthwise conv impl={impl!r} is not one of 'conv', 'shift'.")
    return _kernel_blocks(x, kernel, padding, stride)


def _kernel_blocks(x: jax.Array, kernel: jax.Array, padding: int, s: int) -> jax.Array:
    """The conv as ceil(k/s)^2 products of s x s kernel blocks with unstrided slices.

    The padded input is split into its s x s phases, (N, H/s, s, W/s, s, C); each block of the
    zero-padded kernel then meets one unstrided slice of it. Written as k*k strided slices
    instead, a 9x9/8 conv takes ~10 s to compile with its gradient on XLA:CPU; this ~0.5 s.
    """
    kh, kw = kernel.shape[:2]
    n, h, w, c = x.shape
    out_h, out_w = (h + 2 * padding - kh) // s + 1, (w + 2 * padding - kw) // s + 1
    bh, bw = -(-kh // s), -(-kw // s)  # kernel blocks per axis
    hp, wp = (out_h - 1 + bh) * s, (out_w - 1 + bw) * s  # rows/cols the blocks read
    pad_h, pad_w = (padding, max(0, hp - h - padding)), (padding, max(0, wp - w - padding))
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))[:, :hp, :wp]  # (N, hp, wp, C)
    phases = xp.reshape(n, hp // s, s, wp // s, s, c)  # (N, hp/s, s, wp/s, s, C)
    kp = jnp.pad(kernel[:, :, 0], ((0, bh * s - kh), (0, bw * s - kw), (0, 0)))  # (bh*s, bw*s, C)
    kp = kp.reshape(bh, s, bw, s, c)  # (bh, s, bw, s, C)
    out = None
    for a in range(bh):
        for b in range(bw):
            window = phases[:, a : a + out_h, :, b : b + out_w, :, :]  # (N, out_h, s, out_w, s, C)
            term = (window * kp[a, :, b][:, None]).sum(axis=(2, 4))  # (N, out_h, out_w, C)
            out = term if out is None else out + term
    return out
