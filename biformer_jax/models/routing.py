"""Bi-Level Routing Attention (BiFormer, Zhu et al., CVPR 2023), NHWC.

Ported from rayleizhu/BiFormer `ops/bra_legacy.py` (commit 1697bbb): the feature map is cut
into n_win x n_win regions; region-level queries and keys (token means) pick, per query
region, the `topk` most related regions (`jax.lax.top_k`); tokens then attend to the
tokens of those regions only (`jnp.take_along_axis` on the region axis). A depthwise conv
on V (LePE) is added to the output. Kept from the official code on purpose: the scale is
`qk_dim ** -0.5` over the whole qk width, and with auto_pad the zero-padded tokens are
projected (so carry the qkv bias) and take part in routing and attention.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models.layers import DepthwiseConv2d, Dtype, LayerNormParams, NormDense, dense, is_zero_pad
from biformer_jax.ops.routed_attention import routed_attention
from biformer_jax.ops.topk import topk

KV_DOWNSAMPLE_MODES = ("ada_avgpool", "ada_maxpool", "maxpool", "avgpool", "identity")


def _adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    # PyTorch's AdaptiveXxxPool2d bins: [floor(i*size/out), ceil((i+1)*size/out)).
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def _pool(x: jax.Array, reduce: str) -> jax.Array:
    return jnp.max(x, axis=(-3, -2)) if reduce == "max" else jnp.mean(x, axis=(-3, -2))


def adaptive_pool(x: jax.Array, out: int, reduce: str) -> jax.Array:
    """AdaptiveAvg/MaxPool2d(out) over axes (-3, -2) of (..., h, w, C)."""
    h, w = x.shape[-3], x.shape[-2]
    if h % out == 0 and w % out == 0:
        return window_pool(x, h // out, w // out, reduce)
    rows = []
    for hs, he in _adaptive_bounds(h, out):
        cols = [_pool(x[..., hs:he, ws:we, :], reduce) for ws, we in _adaptive_bounds(w, out)]
        rows.append(jnp.stack(cols, axis=-2))  # (..., out, C)
    return jnp.stack(rows, axis=-3)  # (..., out, out, C)


def window_pool(x: jax.Array, kh: int, kw: int, reduce: str) -> jax.Array:
    """Max/AvgPool2d(kernel=stride=(kh, kw), floor mode) over axes (-3, -2) of (..., h, w, C)."""
    *lead, h, w, c = x.shape
    oh, ow = h // kh, w // kw
    x = x[..., : oh * kh, : ow * kw, :].reshape(*lead, oh, kh, ow, kw, c)  # (..., oh, kh, ow, kw, C)
    return jnp.max(x, axis=(-4, -2)) if reduce == "max" else jnp.mean(x, axis=(-4, -2))


def kv_downsample(x: jax.Array, mode: str, kv_per_win: int, ratio: int) -> jax.Array:
    """The official `kv_down`, applied within each region. x: (N, P, h, w, C)."""
    if mode == "identity":
        return x
    if mode in ("ada_avgpool", "ada_maxpool"):
        return adaptive_pool(x, kv_per_win, "max" if mode == "ada_maxpool" else "avg")
    if ratio <= 1:  # the official code uses nn.Identity for ratio 1
        return x
    h, w = x.shape[-3], x.shape[-2]
    if isinstance(h, int) and isinstance(w, int) and min(h, w) < ratio:  # symbolic sizes: export constraints
        raise ValueError(
            f"kv_downsample_mode={mode!r} pools {ratio}x{ratio} tokens, but the regions hold {h}x{w}: the "
            "input is too small for this model (PyTorch's pooling refuses it too); feed a larger image."
        )
    return window_pool(x, ratio, ratio, "max" if mode == "maxpool" else "avg")


@dataclasses.dataclass(frozen=True)
class RoutingSettings:
    """The bi-level routing attention settings of one stage, in one hashable value.

    BiFormer and DeBiFormer build one per stage from their official constructor arguments
    (`stages.stage_routing`) and hand it unchanged to their blocks and attentions. Field
    names are the official module's; the defaults are its `BiLevelRoutingAttention`'s.
    """

    num_heads: int = 8
    n_win: int = 7
    qk_dim: Optional[int] = None  # None: the attention's width
    qk_scale: Optional[float] = None  # None: qk_dim ** -0.5
    kv_per_win: int = 4
    kv_downsample_ratio: int = 4
    kv_downsample_mode: str = "identity"
    topk: int = 4
    param_attention: str = "qkvo"
    param_routing: bool = False
    diff_routing: bool = False
    soft_routing: bool = False
    side_dwconv: int = 3
    auto_pad: bool = False
    attn_impl: str = "auto"  # routed attention, biformer_jax.ops.routed_attention
    dwconv_impl: str = "auto"  # every depthwise conv: 'auto' | 'conv' | 'shift'
    topk_ties: str = "xla"  # the router's exact-tie order, biformer_jax.ops.topk
    torch_init: bool = False  # PyTorch's default Linear init (DeBiFormer) instead of trunc_normal(.02)

    def check(self, dim: int) -> None:
        """Raises a ValueError naming the setting that an attention of width `dim` cannot use."""
        if self.param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention={self.param_attention!r} is not one of 'qkvo', 'qkv'.")
        if self.diff_routing and not self.soft_routing:
            raise ValueError(
                "diff_routing=True without soft_routing is 'hard differentiable routing', which the "
                "official code leaves unimplemented; set soft_routing=True as well."
            )
        qk_dim, num_heads, n_win, topk = self.qk_dim or dim, self.num_heads, self.n_win, self.topk
        kv_downsample_mode, kv_per_win, kv_downsample_ratio = (
            self.kv_downsample_mode,
            self.kv_per_win,
            self.kv_downsample_ratio,
        )
        if num_heads <= 0 or qk_dim % num_heads or dim % num_heads:
            raise ValueError(
                f"Bi-level routing attention needs qk_dim ({qk_dim}) and dim ({dim}) divisible by "
                f"num_heads ({num_heads}); num_heads is qk_dim // head_dim, so choose head_dim dividing "
                "both widths."
            )
        if n_win <= 0:
            raise ValueError(f"n_win must be positive, got {n_win}.")
        if topk > n_win * n_win:
            raise ValueError(
                f"topk={topk} routes to more regions than the {n_win}x{n_win}={n_win * n_win} there are; "
                f"use topk <= {n_win * n_win} or a larger n_win."
            )
        if kv_downsample_mode not in KV_DOWNSAMPLE_MODES:
            extra = (
                " (the official code raises NotImplementedError for it too)"
                if kv_downsample_mode in ("fracpool", "conv")
                else ""
            )
            raise ValueError(
                f"kv_downsample_mode={kv_downsample_mode!r} is not supported{extra}; use one of {KV_DOWNSAMPLE_MODES}."
            )
        if kv_downsample_mode.startswith("ada_") and (kv_per_win is None or kv_per_win <= 0):
            raise ValueError(
                f"kv_downsample_mode={kv_downsample_mode!r} needs kv_per_wins > 0 for every routed stage, "
                f"got {kv_per_win}."
            )
        if kv_downsample_mode in ("avgpool", "maxpool") and (kv_downsample_ratio is None or kv_downsample_ratio < 1):
            raise ValueError(
                f"kv_downsample_mode={kv_downsample_mode!r} needs kv_downsample_ratios >= 1, got {kv_downsample_ratio}."
            )


class TopkRouting(nn.Module):
    """Region-to-region routing: scores (N, P, P), keeps the top `routing.topk` per query region.

    Records the picked indices with `sow('intermediates', 'route', ...)`, shape (N, P, k).
    """

    qk_dim: int
    routing: RoutingSettings
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q_win: jax.Array, k_win: jax.Array):
        r = self.routing
        if not r.diff_routing:
            q_win, k_win = jax.lax.stop_gradient(q_win), jax.lax.stop_gradient(k_win)
        if r.param_routing:
            fan_in = self.qk_dim if r.torch_init else None
            emb = dense(self.qk_dim, "emb", self.dtype, self.param_dtype, torch_init_fan_in=fan_in)
            q_win, k_win = emb(q_win), emb(k_win)
        scale = r.qk_scale or self.qk_dim**-0.5
        logits = jnp.einsum("npc,nqc->npq", q_win * scale, k_win, preferred_element_type=jnp.float32)  # (N, P, P)
        top_logits, r_idx = topk(logits, r.topk, r.topk_ties)  # (N, P, k), (N, P, k)
        r_weight = jax.nn.softmax(top_logits, axis=-1)  # (N, P, k)
        self.sow("intermediates", "route", r_idx)
        return r_weight, r_idx


class BiLevelRoutingAttention(nn.Module):
    """BRA on an NHWC map. Submodule names follow the official module for conversion.

    `routing` holds every setting (`RoutingSettings`); with `norm` (a block's pre-norm, whose
    parameters stay the block's) it computes BRA(norm(x)), the norm fused into the qkv Linear.
    """

    dim: int
    routing: RoutingSettings = RoutingSettings()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm: Optional[LayerNormParams] = None

    @property
    def _qk_dim(self) -> int:
        return self.routing.qk_dim or self.dim

    def setup(self):
        r, qk, dt, pdt = self.routing, self._qk_dim, self.dtype, self.param_dtype
        r.check(self.dim)
        if r.param_routing and not r.diff_routing:
            raise ValueError("param_routing=True needs diff_routing=True (as in the official code).")
        fan_in = self.dim if r.torch_init else None
        self.qkv = _QKVLinear(self.dim, qk, dt, pdt, r.torch_init, self.norm)
        self.wo = dense(self.dim, "wo", dt, pdt, torch_init_fan_in=fan_in) if r.param_attention == "qkvo" else None
        self.lepe = (
            DepthwiseConv2d(r.side_dwconv, impl=r.dwconv_impl, dtype=dt, param_dtype=pdt) if r.side_dwconv > 0 else None
        )
        self.router = TopkRouting(qk, r, dt, pdt)

    def __call__(self, x: jax.Array) -> jax.Array:
        r = self.routing
        n, h_in, w_in, c = x.shape
        p, qk = r.n_win, self._qk_dim
        h, w, pad = region_grid(h_in, w_in, p, r.auto_pad)  # region size in tokens; (bottom, right) pad

        # Padding (auto_pad) goes after the norm, as in the official code: zero tokens.
        q, kv = self.qkv(x, pad)  # (N, p*h, p*w, Cqk), (N, p*h, p*w, Cqk + C)
        q_reg = to_regions(q, p)  # (N, P, h, w, Cqk)
        kv_reg = to_regions(kv, p)  # (N, P, h, w, Cqk + C)
        kv_pix = kv_downsample(kv_reg, r.kv_downsample_mode, r.kv_per_win, r.kv_downsample_ratio)
        kv_pix = kv_pix.reshape(n, p * p, -1, qk + c)  # (N, P, hk*wk, Cqk + C)
        q_pix = q_reg.reshape(n, p * p, h * w, qk)  # (N, P, h*w, Cqk)

        q_win = q_reg.mean(axis=(2, 3))  # (N, P, Cqk)
        k_win = kv_reg[..., :qk].mean(axis=(2, 3))  # (N, P, Cqk)
        r_weight, r_idx = self.router(q_win, k_win)  # (N, P, k) each

        out = routed_attention(
            q_pix,
            kv_pix,
            r_idx,
            r_weight if r.soft_routing else None,
            num_heads=r.num_heads,
            scale=r.qk_scale or qk**-0.5,
            impl=r.attn_impl,
        )  # (N, P, h*w, C)
        out = from_regions(out.reshape(n, p * p, h, w, c), p)  # (N, H, W, C)
        if self.lepe is not None:
            out = out + self.lepe(kv[..., qk:])
        if self.wo is not None:
            out = self.wo(out)
        return jax.lax.slice(out, (0, 0, 0, 0), (n, h_in, w_in, out.shape[-1]))  # (N, H_in, W_in, C)


class _QKVLinear(nn.Module):
    """The official `QKVLinear`: one Linear to (q, kv), held as `qkv.qkv`; with `norm`, the
    norm before it, fused (`NormDense`)."""

    dim: int
    qk_dim: int
    dtype: Dtype
    param_dtype: Dtype
    torch_init: bool = False
    norm: Optional[LayerNormParams] = None

    @nn.compact
    def __call__(self, x: jax.Array, pad: tuple[int, int] = (0, 0)) -> tuple[jax.Array, jax.Array]:
        """x (N, H_in, W_in, C) -> q (N, H, W, Cqk), kv (N, H, W, Cqk + C), zero-padded by `pad`."""
        fan_in = self.dim if self.torch_init else None
        features = 2 * self.qk_dim + self.dim
        if self.norm is not None:
            fuse = NormDense(self.norm, features, self.qk_dim, fan_in, self.dtype, self.param_dtype, name="qkv")
            q, kv = fuse(x, pad)
            return q, kv
        if not is_zero_pad(pad):
            x = jnp.pad(x, ((0, 0), (0, pad[0]), (0, pad[1]), (0, 0)))
        y = dense(features, "qkv", self.dtype, self.param_dtype, torch_init_fan_in=fan_in)(x)
        return y[..., : self.qk_dim], y[..., self.qk_dim :]


def region_grid(h_in, w_in, p: int, auto_pad: bool):
    """(h, w, (pad_b, pad_r)): the region size in tokens of an h_in x w_in map cut into p x p
    regions, and the bottom/right zero padding that makes it p*h x p*w.

    Without auto_pad p must divide the map (a ValueError says what to do otherwise). With it,
    the region size is a ceiling division and the pad is what is left to p*h, written so that
    symbolic dimensions (jax.export shape polymorphism) express it: `-(-h_in // p)` and
    `p * h - h_in` trace where `h_in + (-h_in) % p` would not divide back by p, and the pad is
    then always applied, even where it comes to 0.
    """
    if not auto_pad:
        if not (isinstance(h_in, int) and isinstance(w_in, int)):
            raise ValueError(
                f"Bi-level routing attention without auto_pad needs a fixed-size {h_in}x{w_in} feature map "
                f"(n_win={p} must divide it); symbolic height/width need auto_pad=True."
            )
        if h_in % p or w_in % p:
            raise ValueError(
                f"Bi-level routing attention got a {h_in}x{w_in} feature map, which n_win={p} does "
                f"not divide; pass auto_pad=True to pad it (as for dense prediction), or feed "
                f"images whose side is a multiple of 32 * n_win = {32 * p}."
            )
        return h_in // p, w_in // p, (0, 0)
    h, w = -(-h_in // p), -(-w_in // p)
    return h, w, (p * h - h_in, p * w - w_in)


def to_regions(x: jax.Array, p: int) -> jax.Array:
    """(N, p*h, p*w, C) -> (N, p*p, h, w, C), regions in row-major order."""
    n, hh, ww, c = x.shape
    h, w = hh // p, ww // p
    x = x.reshape(n, p, h, p, w, c)  # (N, j, h, i, w, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, p * p, h, w, c)  # (N, j*i, h, w, C)


def from_regions(x: jax.Array, p: int) -> jax.Array:
    """(N, p*p, h, w, C) -> (N, p*h, p*w, C); inverse of `to_regions`."""
    n, _, h, w, c = x.shape
    x = x.reshape(n, p, p, h, w, c)  # (N, j, i, h, w, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, p * h, p * w, c)  # (N, j*h, i*w, C)
