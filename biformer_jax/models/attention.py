"""The non-routed token mixers of BiFormer blocks (official `models/_common.py`).

topk = -1: `Attention`, global multi-head attention; topk = -2: `AttentionLePE`, the same
plus a depthwise conv on the block input; topk = 0: `PseudoAttention`, 1x1 conv, 5x5
depthwise conv, 1x1 conv. As released, the first two always use 8 heads, no qkv bias and
the scale (dim / 8) ** -0.5, whatever the model's head_dim and qk_scale say.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models.layers import DepthwiseConv2d, Dtype, conv2d, dense


def global_attention(x: jax.Array, qkv: nn.Module, num_heads: int, scale: float) -> jax.Array:
    """Multi-head self-attention over all tokens. x: (N, L, C) -> (N, L, C)."""
    n, l, c = x.shape
    qkv_t = qkv(x).reshape(n, l, 3, num_heads, c // num_heads)  # (N, L, 3, m, C/m)
    q, k, v = qkv_t[:, :, 0], qkv_t[:, :, 1], qkv_t[:, :, 2]  # (N, L, m, C/m) each
    logits = jnp.einsum("nqmc,nkmc->nmqk", q, k, preferred_element_type=jnp.float32) * scale
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (N, m, L, L)
    return jnp.einsum("nmqk,nkmc->nqmc", attn, v).reshape(n, l, c)  # (N, L, C)


class Attention(nn.Module):
    """topk = -1: vanilla global attention on an NHWC map."""

    dim: int
    num_heads: int = 8
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_heads(self.dim, self.num_heads, "Attention (topk=-1)")
        n, h, w, c = x.shape
        qkv = dense(3 * c, "qkv", self.dtype, self.param_dtype, use_bias=False)
        y = global_attention(x.reshape(n, h * w, c), qkv, self.num_heads, (c // self.num_heads) ** -0.5)
        y = dense(c, "proj", self.dtype, self.param_dtype)(y)
        return y.reshape(n, h, w, c)


class AttentionLePE(nn.Module):
    """topk = -2: global attention plus LePE (a depthwise conv on the input, not on V)."""

    dim: int
    num_heads: int = 8
    side_dwconv: int = 5
    dwconv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_heads(self.dim, self.num_heads, "AttentionLePE (topk=-2)")
        n, h, w, c = x.shape
        qkv = dense(3 * c, "qkv", self.dtype, self.param_dtype, use_bias=False)
        y = global_attention(x.reshape(n, h * w, c), qkv, self.num_heads, (c // self.num_heads) ** -0.5)
        y = y.reshape(n, h, w, c)
        if self.side_dwconv > 0:
            y = y + DepthwiseConv2d(
                self.side_dwconv, impl=self.dwconv_impl, dtype=self.dtype, param_dtype=self.param_dtype, name="lepe"
            )(x)
        return dense(c, "proj", self.dtype, self.param_dtype)(y)


class PseudoAttention(nn.Module):
    """topk = 0: 1x1 conv -> 5x5 depthwise conv -> 1x1 conv (official Sequential indices 1, 2, 3)."""

    dim: int
    dwconv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, dt, pdt = self.dim, self.dtype, self.param_dtype
        x = conv2d(c, 1, x.shape[-1], "1", dt, pdt)(x)
        x = DepthwiseConv2d(5, impl=self.dwconv_impl, dtype=dt, param_dtype=pdt, name="2")(x)
        return conv2d(c, 1, c, "3", dt, pdt)(x)


def check_heads(dim: int, num_heads: int, what: str) -> None:
    if dim % num_heads:
        raise ValueError(
            f"{what} splits its width {dim} into {num_heads} heads (fixed in the official code); "
            f"use a stage width divisible by {num_heads}."
        )
