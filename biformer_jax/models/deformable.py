"""Deformable Bi-Level Routing Attention (DeBiFormer, Long et al., ACCV 2024), NHWC.

Ported from maclong01/DeBiFormer `classification/debiformer.py` (commit 1ceb090),
`DeBiLevelRoutingAttention`. On a feature map of H x W tokens it
1. places a grid of deformed points (one per `stride` x `stride` tokens): an offset network
   (strided depthwise conv on q, LayerNorm, GELU, 1x1 conv) moves reference points, and the
   points sample the input map bilinearly (`grid_sample`, align_corners=True);
2. lets these points, projected to queries, attend with bi-level routing (region routing,
   then token attention over the routed regions' keys/values, as in BiFormer), adds a
   strided LePE, a 1x1 conv and the sampled features, then an MLP: the "agent" tokens;
3. lets every token's query attend to all agent tokens, plus a relative position bias
   sampled from a learned table at the query-to-point displacements.

Kept from the release on purpose, since checkpoints depend on it: the offset network has a
single output channel, so one offset moves each point along y and x alike; positions are
clamped to [-1, 1]; the attention scale is `qk_dim ** -0.5` over the whole width; zero
padding of the maps (and of the point positions, to the map centre) takes part in attention.
The release pads only with `auto_pad=True` and crashes otherwise; this port always pads to
the region grid (and crops after), so it accepts any input size.

The per-stage settings the release hard-codes by `param_size` and stage width are in
`DEFORM_SETTINGS`; `DeformSettings` can be given directly for other widths.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models.layers import (
    DepthwiseConv2d,
    Dtype,
    conv2d,
    conv_init,
    fan_in_uniform_bias,
    is_zero_pad,
    layer_norm,
)
from biformer_jax.models.routing import (
    RoutingSettings,
    TopkRouting,
    from_regions,
    kv_downsample,
    region_grid,
    to_regions,
)
from biformer_jax.ops.depthwise import resolve_dwconv_impl
from biformer_jax.ops.fused import gelu
from biformer_jax.ops.grid_sample import grid_sample
from biformer_jax.ops.routed_attention import routed_attention
from biformer_jax.ops.strided_depthwise import strided_depthwise_conv


class DeformSettings(NamedTuple):
    """What the release's `param_size` table fixes for one stage width."""

    n_groups: int  # offset groups: channels and heads split into this many, one point set each
    offset_kernel: int  # `kk`: kernel of the offset network's depthwise conv
    stride: int  # `stride_def`: one deformed point per stride x stride tokens
    mlp_ratio: int  # `expain_ratio`: hidden width multiplier of the agents' MLP
    q_size: int  # side of the query map the bias table spans: (2 q_size - 1)^2 entries per head


_T = DeformSettings
# param_size -> {stage width: settings}, as released (the table keys on the width alone).
DEFORM_SETTINGS: dict[str, dict[int, DeformSettings]] = {
    "tiny": {64: _T(1, 9, 8, 3, 56), 128: _T(2, 7, 4, 3, 28), 256: _T(4, 5, 2, 3, 14), 512: _T(8, 3, 1, 3, 7)},
    "small": {64: _T(1, 9, 8, 3, 56), 128: _T(2, 7, 4, 3, 28), 256: _T(4, 5, 2, 3, 14), 512: _T(8, 3, 1, 1, 7)},
    "base": {96: _T(1, 9, 8, 3, 56), 192: _T(2, 7, 4, 3, 28), 384: _T(3, 5, 2, 3, 14), 768: _T(6, 3, 1, 3, 7)},
}


def deform_settings(param_size: str, dim: int) -> DeformSettings:
    """The release's settings for a stage of width `dim`; a clear error where it has none."""
    if param_size not in DEFORM_SETTINGS:
        raise ValueError(f"param_size={param_size!r} is not one of {sorted(DEFORM_SETTINGS)}.")
    table = DEFORM_SETTINGS[param_size]
    if dim not in table:
        raise ValueError(
            f"DeBiFormer param_size={param_size!r} defines its deformable attention for stage widths "
            f"{sorted(table)} only, not {dim} (the release fails there too). Pass deform_settings=, one "
            "(n_groups, offset_kernel, stride, mlp_ratio, q_size) per stage, to build other widths."
        )
    return table[dim]


def pad_to_multiple(x: jax.Array, p: int) -> jax.Array:
    """Zero-pads (N, H, W, C) at the bottom/right to (N, p*ceil(H/p), p*ceil(W/p), C).

    Written as a ceiling division (not `H + (-H) % p`) so that symbolic H and W (a jax.export
    with symbolic height/width) give a size p divides; a symbolic map is always padded.
    """
    _, _, pad = region_grid(x.shape[1], x.shape[2], p, auto_pad=True)
    if is_zero_pad(pad):
        return x
    return jnp.pad(x, ((0, 0), (0, pad[0]), (0, pad[1]), (0, 0)))  # (N, p*h, p*w, C)


def _as_float(d, dtype=jnp.float32) -> jax.Array:
    """A (possibly symbolic) dimension as a float scalar array (float32 unless `dtype` says otherwise)."""
    return jnp.asarray(d, dtype)


def _minus_one_at_least_one(n, dtype=jnp.float32):
    """max(n - 1, 1) of a dimension: a Python int, or a `dtype` array for a symbolic n."""
    return max(n - 1, 1) if isinstance(n, int) else jnp.maximum(_as_float(n, dtype) - 1, 1)


def _cell_centres(n, dtype=jnp.float32) -> jax.Array:
    """(n,) centres of n cells spanning [-1, 1]: the release's linspace(0.5, n - 0.5, n) / n * 2 - 1."""
    if isinstance(n, int):
        return (jnp.linspace(0.5, n - 0.5, n, dtype=dtype) / n) * 2 - 1
    # A symbolic n (jnp.linspace needs a concrete count): the same formula linspace uses.
    t = jnp.arange(n, dtype=dtype) / _minus_one_at_least_one(n, dtype)
    return ((0.5 * (1 - t) + (_as_float(n, dtype) - 0.5) * t) / _as_float(n, dtype)) * 2 - 1


def reference_points(h: int, w: int, dtype=jnp.float32) -> jax.Array:
    """Cell centres of an h x w grid in [-1, 1], (h, w, 2) as (y, x) (the release's `_get_ref_points`)."""
    return jnp.stack(jnp.meshgrid(_cell_centres(h, dtype), _cell_centres(w, dtype), indexing="ij"), axis=-1)


def query_grid(h: int, w: int, dtype=jnp.float32) -> jax.Array:
    """Token positions of an h x w map in [-1, 1] (corners at +-1), (h, w, 2) as (y, x)."""
    # The release divides by (h - 1), which is 0/0 for a single row; such a map is centred here.
    ys = jnp.arange(h, dtype=dtype) / _minus_one_at_least_one(h, dtype) * 2 - 1
    xs = jnp.arange(w, dtype=dtype) / _minus_one_at_least_one(w, dtype) * 2 - 1
    return jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1)


def split_groups(x: jax.Array, g: int) -> jax.Array:
    """(N, H, W, g*Cg) -> (N*g, H, W, Cg), channels group-major as the release's NCHW reshape."""
    n, h, w, c = x.shape
    x = x.reshape(n, h, w, g, c // g)  # (N, H, W, g, Cg)
    return x.transpose(0, 3, 1, 2, 4).reshape(n * g, h, w, c // g)  # (N*g, H, W, Cg)


def merge_groups(x: jax.Array, g: int) -> jax.Array:
    """(N*g, H, W, Cg) -> (N, H, W, g*Cg); inverse of `split_groups`."""
    ng, h, w, cg = x.shape
    x = x.reshape(ng // g, g, h, w, cg)  # (N, g, H, W, Cg)
    return x.transpose(0, 2, 3, 1, 4).reshape(ng // g, h, w, g * cg)  # (N, H, W, C)


class StridedDepthwiseConv2d(nn.Module):
    """`nn.Conv2d(C, C, k, stride, padding=k // 2, groups=C)` on NHWC input (the offset network's
    conv and the strided LePE); params `kernel` (k, k, 1, C) and `bias` as `DepthwiseConv2d`."""

    kernel_size: int
    stride: int
    use_bias: bool = True
    impl: str = "auto"  # as DepthwiseConv2d: 'auto' | 'conv' | 'shift'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, x.shape[-1]
        kernel = self.param("kernel", conv_init, (k, k, 1, c), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = strided_depthwise_conv(x, kernel, k // 2, self.stride, resolve_dwconv_impl(self.impl))
        if self.use_bias:
            y = y + self.param("bias", fan_in_uniform_bias(k * k), (c,), self.param_dtype).astype(self.dtype)
        return y


class ConvMlpWithDw(nn.Module):
    """The release's `TransformerMLPWithConv` on NHWC: 1x1 conv, x + dwconv3x3(x), GELU, 1x1 conv.

    Submodules keep the release's names (`linear1.0`, `dwc`, `linear2.0`); its dropout is 0.
    """

    dim: int
    expansion: int
    dwconv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt, hidden = self.dtype, self.param_dtype, int(self.dim * self.expansion)
        x = conv2d(hidden, 1, self.dim, "linear1_0", dt, pdt)(x)
        x = x + DepthwiseConv2d(3, impl=self.dwconv_impl, dtype=dt, param_dtype=pdt, name="dwc")(x)
        return conv2d(self.dim, 1, hidden, "linear2_0", dt, pdt)(gelu(x))


class _QKVConv(nn.Module):
    """The release's `QKVConv`: one 1x1 conv to (q, kv), held as `qkv_conv.qkv`."""

    dim: int
    qk_dim: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array):
        y = conv2d(2 * self.qk_dim + self.dim, 1, self.dim, "qkv", self.dtype, self.param_dtype)(x)
        return y[..., : self.qk_dim], y[..., self.qk_dim :]


class _LayerNormProxy(nn.Module):
    """The release's `LayerNormProxy`: a channel LayerNorm (PyTorch's default eps 1e-5) as `norm`."""

    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm("norm", self.dtype, self.param_dtype, eps=1e-5)(x)


class DeBiLevelRoutingAttention(nn.Module):
    """Deformable bi-level routing attention on an NHWC map; any H, W (pads, then crops).

    Submodule and parameter names follow the release (`qkv_conv.qkv`, `conv_offset_q.{0,1,3}`,
    `proj_{q,k,v,out}`, `unifyheads1`, `lepe1`, `router`, `norm`, `norm2`, `mlp`, `rpe_table`).
    `routing` holds the routing settings; its `auto_pad` is ignored: this module always pads.
    """

    dim: int
    routing: RoutingSettings = RoutingSettings(topk_ties="torch", torch_init=True)
    param_size: str = "small"
    settings: Optional[DeformSettings] = None  # overrides the param_size table
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resolved_settings(self) -> DeformSettings:
        if self.settings is not None:
            return DeformSettings(*self.settings)
        return deform_settings(self.param_size, self.dim)

    def check(self, s: DeformSettings) -> None:
        r = self.routing
        qk = r.qk_dim or self.dim
        if qk != self.dim:
            raise ValueError(
                f"DeBiLevelRoutingAttention needs qk_dim == dim (its queries are split into the same "
                f"groups as the features), got qk_dim={qk}, dim={self.dim}; set qk_dims equal to embed_dim."
            )
        r.check(self.dim)
        if r.topk <= 0:
            raise ValueError(f"DeBiLevelRoutingAttention routes to topk > 0 regions, got topk={r.topk}.")
        if s.n_groups <= 0 or self.dim % s.n_groups or r.num_heads % s.n_groups:
            raise ValueError(
                f"deformable attention splits width {self.dim} and {r.num_heads} heads into "
                f"n_groups={s.n_groups} groups; choose n_groups dividing both."
            )
        if min(s.offset_kernel, s.stride, s.mlp_ratio, s.q_size) <= 0 or s.offset_kernel % 2 == 0:
            raise ValueError(f"invalid deformable settings {s}: positive values and an odd offset_kernel needed.")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s, r = self.resolved_settings(), self.routing
        self.check(s)
        dt, pdt = self.dtype, self.param_dtype
        n, h_in, w_in, c = x.shape
        p, g, m, qk = r.n_win, s.n_groups, r.num_heads, self.dim
        scale = r.qk_scale or qk**-0.5

        x = pad_to_multiple(x.astype(dt), p)  # (N, H, W, C)
        _, hh, ww, _ = x.shape
        q, kv = _QKVConv(c, qk, dt, pdt, name="qkv_conv")(x)  # (N, H, W, C), (N, H, W, 2C)
        kv_reg = to_regions(kv, p)  # (N, P, h, w, 2C)
        kv_pix = kv_downsample(kv_reg, r.kv_downsample_mode, r.kv_per_win, r.kv_downsample_ratio)
        kv_pix = kv_pix.reshape(n, p * p, -1, qk + c)  # (N, P, Tkv, 2C)

        # --- deformed points: the offset network on q, per group ---------------------------
        off = split_groups(q, g)  # (N*g, H, W, Cg)
        off = StridedDepthwiseConv2d(
            s.offset_kernel,
            s.stride,
            use_bias=False,
            impl=r.dwconv_impl,
            dtype=dt,
            param_dtype=pdt,
            name="conv_offset_q_0",
        )(off)  # (N*g, Hk, Wk, Cg)
        off = gelu(_LayerNormProxy(dt, pdt, name="conv_offset_q_1")(off))
        head = nn.Conv(
            1, (1, 1), use_bias=False, kernel_init=conv_init, dtype=dt, param_dtype=pdt, name="conv_offset_q_3"
        )
        off = head(off)  # (N*g, Hk, Wk, 1)
        _, hk, wk, _ = off.shape
        # One offset channel, broadcast to (y, x) as the release does; positions stay in [-1, 1].
        # Positions, logits and the position bias are computed in float32 at least (bfloat16 runs
        # keep them in float32; float64 runs in float64).
        acc = jnp.promote_types(dt, jnp.float32)
        pos = jnp.clip(off.astype(acc) + reference_points(hk, wk, acc), -1.0, 1.0)  # (N*g, Hk, Wk, 2)
        sampled = grid_sample(split_groups(x, g), pos[..., ::-1])  # (N*g, Hk, Wk, Cg)
        sampled = merge_groups(sampled, g)  # (N, Hk, Wk, C)

        lepe = None
        if r.side_dwconv > 0:
            lepe = StridedDepthwiseConv2d(
                r.side_dwconv,
                s.stride,
                impl=r.dwconv_impl,
                dtype=dt,
                param_dtype=pdt,
                name="lepe1",
            )(kv[..., qk:])  # (N, Hk, Wk, C)

        # --- agents: bi-level routing attention of the points over the map -----------------
        sampled = pad_to_multiple(sampled, p)  # (N, Hg, Wg, C)
        _, hg, wg, _ = sampled.shape
        pos = pad_to_multiple(pos, p)  # (N*g, Hg, Wg, 2); padded points sit at the map centre
        queries = conv2d(c, 1, c, "proj_q", dt, pdt)(sampled)  # (N, Hg, Wg, C)
        q_reg = to_regions(queries, p)  # (N, P, hq, wq, C)
        q_win = q_reg.mean(axis=(2, 3))  # (N, P, C)
        k_win = kv_reg[..., :qk].mean(axis=(2, 3))  # (N, P, C)
        router = TopkRouting(qk, r, dt, pdt, name="router")
        r_weight, r_idx = router(q_win, k_win)  # (N, P, k) each
        agents = routed_attention(
            q_reg.reshape(n, p * p, -1, qk),  # (N, P, hq*wq, C)
            kv_pix,
            r_idx,
            r_weight if r.soft_routing else None,
            num_heads=m,
            scale=scale,
            impl=r.attn_impl,
        )  # (N, P, hq*wq, C)
        agents = from_regions(agents.reshape(n, p * p, hg // p, wg // p, c), p)  # (N, Hg, Wg, C)
        if lepe is not None:
            agents = agents + pad_to_multiple(lepe, p)
        agents = sampled + conv2d(c, 1, c, "unifyheads1", dt, pdt)(agents)
        mlp = ConvMlpWithDw(c, s.mlp_ratio, r.dwconv_impl, dt, pdt, name="mlp")
        agents = agents + mlp(layer_norm("norm2", dt, pdt)(agents))
        agents = layer_norm("norm", dt, pdt)(agents)  # (N, Hg, Wg, C)

        # --- every token attends to all agents, with a sampled relative position bias -------
        ns = hg * wg
        k = conv2d(c, 1, c, "proj_k", dt, pdt)(agents).reshape(n, ns, m, c // m)  # (N, Ns, m, C/m)
        v = conv2d(c, 1, c, "proj_v", dt, pdt)(agents).reshape(n, ns, m, c // m)  # (N, Ns, m, C/m)
        qh = q.reshape(n, hh * ww, m, c // m)  # (N, HW, m, C/m)
        logits = jnp.einsum("nqmc,nkmc->nmqk", qh, k, preferred_element_type=acc) * scale  # (N, m, HW, Ns)
        # timm's trunc_normal_(std=.01) cuts at +-2 absolute, i.e. 200 std: a plain normal.
        rpe_table = self.param(
            "rpe_table",
            nn.initializers.normal(stddev=0.01),
            (m, 2 * s.q_size - 1, 2 * s.q_size - 1),
            pdt,
        )
        logits = logits + position_bias(rpe_table, pos.reshape(n, g, ns, 2), hh, ww)  # (N, m, HW, Ns)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (N, m, HW, Ns)
        out = jnp.einsum("nmqk,nkmc->nqmc", attn, v).reshape(n, hh, ww, c)  # (N, H, W, C)
        out = conv2d(c, 1, c, "proj_out", dt, pdt)(out)
        return jax.lax.slice(out, (0, 0, 0, 0), (n, h_in, w_in, c))  # (N, H_in, W_in, C)


def position_bias(table: jax.Array, pos: jax.Array, h: int, w: int) -> jax.Array:
    """The relative position bias of every token of an h x w map to every deformed point.

    table: (m, Th, Tw) per-head bias over displacements in [-1, 1]^2; pos: (N, g, Ns, 2) point
    positions (y, x) of each group, heads group-major. Returns (N, m, h*w, Ns) in pos.dtype (float32
    at least): the table sampled bilinearly at (query position - point position) / 2.
    """
    m, th, tw = table.shape
    n, g, ns, _ = pos.shape
    hg = m // g
    acc = jnp.promote_types(pos.dtype, jnp.float32)
    disp = (query_grid(h, w, acc).reshape(1, 1, h * w, 1, 2) - pos[:, :, None]) * 0.5  # (N, g, HW, Ns, 2)
    grid = disp[..., ::-1].transpose(1, 0, 2, 3, 4).reshape(g, n * h * w * ns, 2)  # (g, N*HW*Ns, 2) as (x, y)
    image = table.astype(acc).reshape(g, hg, th, tw).transpose(0, 2, 3, 1)  # (g, Th, Tw, hg)
    bias = grid_sample(image, grid).reshape(g, n, h * w, ns, hg)  # (g, N, HW, Ns, hg)
    return bias.transpose(1, 0, 4, 2, 3).reshape(n, m, h * w, ns)  # (N, g*hg, HW, Ns)
