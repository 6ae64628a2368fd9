"""Stride-1 depthwise convolution, `nn.Conv2d(C, C, k, padding=p, groups=C)` on NHWC.

Two implementations of the same function: XLA's grouped convolution ('conv'), and a sum of
shifted slices with a hand-written VJP ('shift'), which XLA:CPU runs far faster (its grouped
convolution is ~70x slower than PyTorch's: ../shared/NOTES.md, beside the repository). The
strided case is `ops.strided_depthwise`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from biformer_jax.ops.recompute import tie


def resolve_dwconv_impl(impl: str) -> str:
    """'auto' picks shifted sums on CPU (see the module docstring), XLA's conv elsewhere."""
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "conv"
    if impl not in ("conv", "shift"):
        raise ValueError(f"dwconv_impl={impl!r} is not one of 'auto', 'conv', 'shift'.")
    return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: int, impl: str = "auto") -> jax.Array:
    """Stride-1 depthwise convolution. x: (N, H, W, C); kernel: (kh, kw, 1, C)."""
    if resolve_dwconv_impl(impl) == "conv":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1, 1),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    return shift_depthwise_conv(x, kernel, padding)


def _shifted_sum(x: jax.Array, kernel: jax.Array, pad_h: int, pad_w: int) -> jax.Array:
    """sum_ij pad(x)[:, i:i+H', j:j+W'] * kernel[i, j]: one fused loop in XLA, no copies.

    Pads (per side) may be negative (a crop), as the input gradient needs when pad > k - 1.
    """
    kh, kw = kernel.shape[:2]
    _, h, w, _ = x.shape
    out_h, out_w = h + 2 * pad_h - kh + 1, w + 2 * pad_w - kw + 1
    zero = jnp.zeros((), x.dtype)
    xp = jax.lax.pad(x, zero, ((0, 0, 0), (pad_h, pad_h, 0), (pad_w, pad_w, 0), (0, 0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i : i + out_h, j : j + out_w, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shift_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Depthwise conv as a sum of shifted slices, with a hand-written VJP.

    Left to autodiff, XLA materialises every shifted slice in the forward pass to reuse it
    for the kernel gradient (kh*kw copies of the input, kept for the backward pass). Here
    the forward keeps only x; the input gradient is the same shifted sum over the output
    gradient with the kernel flipped; the kernel gradient is kh*kw reductions, each fused
    with its slice.
    """
    return _shifted_sum(x, kernel, padding, padding)


def _shift_dwconv_fwd(x, kernel, padding):
    return _shifted_sum(x, kernel, padding, padding), (x, kernel)


def _shift_dwconv_bwd(padding, res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    # x[h] feeds out[h + padding - i]: the transpose correlates g, padded by k - 1 - padding,
    # with the flipped kernel.
    dx = _shifted_sum(g, kernel[::-1, ::-1], kh - 1 - padding, kw - 1 - padding)
    dk = _kernel_grad(tie(g, x), g, kh, kw, padding)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


KERNEL_GRAD_BLOCK = 8  # output columns per matmul block of the depthwise kernel gradient


def _kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int, padding: int) -> jax.Array:
    """dk[i, j, c] = sum_{n,h,w} pad(x)[n, h+i, w+j, c] * g[n, h, w, c] as one batched matmul.

    x: (N, H, W, C), g: (N, H', W', C) -> (kh, kw, 1, C) float32. kh*kw separate reductions
    would each read a materialised shifted copy of x (XLA:CPU fuses no slice into a
    reduction). Instead, per channel and block of B output columns, one matmul over the
    rows (n, h) of x's column window (B + kw - 1 columns) against the block of g shifted
    down by each row tap i (kh*B columns) gives every (input column, row tap, output column)
    product sum of the block; the kw diagonals of each row tap's (B + kw - 1, B) slab are
    the kw column taps. (One matmul with the row taps side by side: kh separate matmuls of
    B columns each, reading g kh times, took 1.5x as long over BiFormer-T's depthwise convs,
    batch 8 at 224, timed alone.)
    """
    n, out_h, out_w, c = g.shape
    bsz = KERNEL_GRAD_BLOCK
    nb = -(-out_w // bsz)
    extra = nb * bsz - out_w  # zero columns that round the output width up to whole blocks
    span = bsz + kw - 1
    hp = out_h + kh - 1  # = H + 2 * padding: the padded rows of x
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding + extra), (0, 0)))  # (N, Hp, nb*B+kw-1, C)
    win = jnp.stack([xp[:, :, b * bsz : b * bsz + span, :] for b in range(nb)])  # (nb, N, Hp, span, C)
    win = win.transpose(4, 0, 3, 1, 2).reshape(c, nb, span, n * hp)  # (C, nb, span, N*Hp)
    gp = jnp.pad(g, ((0, 0), (0, 0), (0, extra), (0, 0))).reshape(n, out_h, nb, bsz, c)  # (N, H', nb, B, C)
    gt = gp.transpose(4, 2, 0, 1, 3)  # (C, nb, N, H', B)
    # Row tap i: g shifted down by i rows within each image's Hp rows.
    gs = [jnp.pad(gt, ((0, 0), (0, 0), (0, 0), (i, kh - 1 - i), (0, 0))) for i in range(kh)]  # (C, nb, N, Hp, B)
    gs = jnp.stack(gs, axis=-2).reshape(c, nb, n * hp, kh * bsz)  # (C, nb, N*Hp, kh*B)
    m = jnp.einsum("cbsr,cbrq->cbsq", win, gs, preferred_element_type=jnp.float32)  # (C, nb, span, kh*B)
    m = m.reshape(c, nb, span, kh, bsz)  # (C, nb, span, kh, B)
    # Column tap j: the products of input column t + j with output column t.
    taps = [jnp.diagonal(m[:, :, j : j + bsz], axis1=2, axis2=4).sum(axis=(1, 3)) for j in range(kw)]  # (C, kh)
    return jnp.stack(taps).transpose(2, 0, 1)[:, :, None, :]  # (kh, kw, 1, C)


shift_depthwise_conv.defvjp(_shift_dwconv_fwd, _shift_dwconv_bwd)
