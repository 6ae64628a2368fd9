"""DeBiFormer: Vision Transformer with Deformable Agent Bi-level Routing Attention
(Long et al., ACCV 2024).

Ported from maclong01/DeBiFormer `classification/debiformer.py` (commit 1ceb090). NHWC in,
logits out. The stem, downsampling layers, final BatchNorm and head are BiFormer's; each
block runs two token mixers, each followed by an MLP with a depthwise conv:

    x + pos_embed1(x) -> attn1 -> mlp1 -> x + pos_embed2(x) -> attn2 -> mlp2

where, by the stage's topk (the release's branches), attn1 is BiFormer's bi-level routing
attention with topk 1 / 4 / 16 for topk 4 / 8 / 16 and attn2 the deformable one
(`deformable.DeBiLevelRoutingAttention`) with topk 4 / 8 / 16; for topk -2 both are
deformable and route to every region (the release writes 49, i.e. n_win = 7).

What differs from the release, which does not run as published (README "DeBiFormer"):
the attention always pads to the region grid (any input size works; the release needs
auto_pad=True, which no `debi_*` constructor passes, and misspells it `uto_pad` in four
of its Block's attention constructors); layer scale applies its MLPs to the NHWC map
(the release's layer-scale branches pass NHWC to an NCHW MLP and fail). Module names follow
the release's state_dict, so `biformer_jax.convert` maps checkpoints by rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models.biformer import Downsample, Stem, stochastic_depth_rates
from biformer_jax.models.deformable import ConvMlpWithDw, DeBiLevelRoutingAttention, DeformSettings, deform_settings
from biformer_jax.models.layers import (
    BatchNorm,
    DepthwiseConv2d,
    DropPath,
    Dtype,
    check_nhwc_input,
    dense,
    layer_norm,
    per_stage,
)
from biformer_jax.models.routing import BiLevelRoutingAttention

# Block topk -> (attn1's routing topk, attn2's), the release's `Block` branches; -2 is "all regions".
BLOCK_TOPKS: dict[int, tuple[int, int]] = {4: (1, 4), 8: (4, 8), 16: (16, 16), -2: (-2, -2)}


def check_block_topk(topk: int) -> None:
    if topk not in BLOCK_TOPKS:
        why = (
            "its Block builds a module for it that forward never calls, so it crashes"
            if topk in (-1, 0)
            else "its Block builds no attention for it"
        )
        raise ValueError(
            f"topk={topk} is not a DeBiFormer block: the release defines topks 4, 8, 16 and -2 only "
            f"({why}); use one of those per stage."
        )


class DeBiFormerBlock(nn.Module):
    """One DeBiFormer block (the release's `Block`): two token mixers and two MLPs, NHWC."""

    dim: int
    drop_path: float = 0.0
    layer_scale_init_value: float = -1.0
    num_heads: int = 8
    n_win: int = 7
    qk_dim: Optional[int] = None
    qk_scale: Optional[float] = None
    kv_per_win: int = 4
    kv_downsample_ratio: int = 4
    kv_downsample_mode: str = "ada_avgpool"
    topk: int = 4
    param_attention: str = "qkvo"
    param_routing: bool = False
    diff_routing: bool = False
    soft_routing: bool = False
    mlp_ratio: float = 4
    param_size: str = "small"
    mlp_dwconv: bool = False  # accepted and unused, as in the release
    side_dwconv: int = 5
    before_attn_dwconv: int = 3
    pre_norm: bool = True
    auto_pad: bool = False  # accepted; the attention always pads
    settings: Optional[DeformSettings] = None
    all_regions_topk: Optional[int] = None  # topk -2 routes to this many regions (None: n_win**2)
    routing_ties: str = "torch"
    attn_impl: str = "auto"
    dwconv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _routing_kwargs(self) -> dict[str, Any]:
        return dict(
            dim=self.dim,
            num_heads=self.num_heads,
            n_win=self.n_win,
            qk_dim=self.qk_dim,
            qk_scale=self.qk_scale,
            kv_per_win=self.kv_per_win,
            kv_downsample_ratio=self.kv_downsample_ratio,
            kv_downsample_mode=self.kv_downsample_mode,
            param_attention=self.param_attention,
            param_routing=self.param_routing,
            diff_routing=self.diff_routing,
            soft_routing=self.soft_routing,
            side_dwconv=self.side_dwconv,
            auto_pad=True,
            topk_ties=self.routing_ties,
            attn_impl=self.attn_impl,
            dwconv_impl=self.dwconv_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def deformable(self, topk: int, name: str) -> DeBiLevelRoutingAttention:
        settings = self.settings if self.settings is not None else deform_settings(self.param_size, self.dim)
        if topk == -2:
            topk = self.all_regions_topk or self.n_win * self.n_win
        return DeBiLevelRoutingAttention(
            topk=topk, param_size=self.param_size, settings=settings, name=name, **self._routing_kwargs()
        )

    def token_mixers(self) -> tuple[nn.Module, nn.Module]:
        check_block_topk(self.topk)
        k1, k2 = BLOCK_TOPKS[self.topk]
        if k1 == -2:
            attn1 = self.deformable(k1, "attn1")
        else:
            # The release builds this BRA from nn.Linear and never re-initialises it.
            attn1 = BiLevelRoutingAttention(topk=k1, torch_init=True, name="attn1", **self._routing_kwargs())
        return attn1, self.deformable(k2, "attn2")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt, pdt, c = self.dtype, self.param_dtype, self.dim
        if self.before_attn_dwconv not in (0, 3) and self.before_attn_dwconv > 0:
            raise ValueError(
                f"before_attn_dwconv={self.before_attn_dwconv}: the release's position-embedding conv pads "
                "by 1, which keeps the map size only for kernel 3; use 3 (or <= 0 for none)."
            )
        attn1, attn2 = self.token_mixers()
        mlp1 = ConvMlpWithDw(c, self.mlp_ratio, self.dwconv_impl, dt, pdt, name="mlp1")
        mlp2 = ConvMlpWithDw(c, self.mlp_ratio, self.dwconv_impl, dt, pdt, name="mlp2")
        norm1, norm2, norm3, norm4 = (layer_norm(f"norm{i}", dt, pdt) for i in (1, 2, 3, 4))
        drop = DropPath(self.drop_path)
        if self.layer_scale_init_value > 0:
            init = nn.initializers.constant(self.layer_scale_init_value)
            gammas = [self.param(f"gamma{i}", init, (c,), pdt).astype(dt) for i in (1, 2, 3, 4)]
        else:
            gammas = [None] * 4

        def scaled(i: int, y: jax.Array) -> jax.Array:
            return drop(y if gammas[i] is None else gammas[i] * y, train)

        def pos_embed(name: str, y: jax.Array) -> jax.Array:
            if self.before_attn_dwconv <= 0:  # the release crashes here (pos_embed1 undefined)
                return y
            conv = DepthwiseConv2d(3, padding=1, impl=self.dwconv_impl, dtype=dt, param_dtype=pdt, name=name)
            return y + conv(y)

        x = pos_embed("pos_embed1", x)
        if self.pre_norm:
            x = x + scaled(0, attn1(norm1(x)))
            x = x + scaled(1, mlp1(norm2(x)))
            x = pos_embed("pos_embed2", x)
            x = x + scaled(2, attn2(norm3(x)))
            x = x + scaled(3, mlp2(norm4(x)))
        elif self.layer_scale_init_value > 0:
            x = norm1(x + scaled(0, attn1(x)))
            x = norm2(x + scaled(1, mlp1(x)))
            x = pos_embed("pos_embed2", x)
            x = norm3(x + scaled(2, attn2(x)))
            x = norm4(x + scaled(3, mlp2(x)))
        else:  # as released: post-norm around the attentions, pre-norm for the MLPs
            x = norm1(x + scaled(0, attn1(x)))
            x = x + scaled(1, mlp1(norm2(x)))
            x = pos_embed("pos_embed2", x)
            x = norm3(x + scaled(2, attn2(x)))
            x = x + scaled(3, mlp2(norm4(x)))
        return x


class DeBiFormer(nn.Module):
    """The release's `DeBiFormer` constructor: same argument names and defaults.

    The defaults are the release's and do not build a working model there or here (width 320
    has no deformable settings, topk -1 no DeBiFormer block); use `debiformer_tiny` etc.
    Extensions: `deform_settings` (one `DeformSettings`-like 5-tuple per stage) replaces the
    `param_size` table for other widths; `routing_ties` ('torch' or 'xla') is how the routers
    break exact score ties, which zero-padded regions produce off the 224 grid: 'torch' picks
    the regions the release picks on CPU, 'xla' (`lax.top_k`) is faster on accelerators and
    gives the same outputs (tied regions hold identical keys and values); `qk_dims` entries
    may be None (the stage width); `features_only`, `attn_impl`, `dwconv_impl`, `dtype` and
    `param_dtype` as in `BiFormer`; `drop_rate` is dropout before the classifier (the release
    ignores it); `all_regions_topk` is how many regions the topk -2 blocks route to (None: all
    n_win**2, the classifier's 49 at n_win 7; the released segmentation backbone hard-codes 49
    at n_win 8, i.e. 49 of 64). `auto_pad` is accepted and has no effect: the attention always pads to the
    region grid.

    Call: `model.apply(variables, x_nhwc, train=False, return_features=False)` gives logits
    (N, num_classes), or `(logits, [f1, f2, f3, f4])` with `return_features=True`; stage i
    has `embed_dim[i]` channels at stride 4 * 2**i.
    """

    depth: Sequence[int] = (3, 4, 8, 3)
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: Sequence[int] = (64, 128, 320, 512)
    head_dim: int = 64
    qk_scale: Optional[float] = None
    representation_size: Optional[int] = None
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    use_checkpoint_stages: Sequence[int] = ()
    n_win: int = 7
    kv_downsample_mode: str = "ada_avgpool"
    kv_per_wins: Sequence[int] = (2, 2, -1, -1)
    topks: Sequence[int] = (8, 8, -1, -1)
    side_dwconv: int = 5
    layer_scale_init_value: float = -1.0
    qk_dims: Sequence[Optional[int]] = (None, None, None, None)
    param_routing: bool = False
    diff_routing: bool = False
    soft_routing: bool = False
    pre_norm: bool = True
    pe: Optional[str] = None
    pe_stages: Sequence[int] = (0,)
    before_attn_dwconv: int = 3
    auto_pad: bool = False
    kv_downsample_kernels: Sequence[int] = (4, 2, 1, 1)
    kv_downsample_ratios: Sequence[int] = (4, 2, 1, 1)
    mlp_ratios: Sequence[float] = (4, 4, 4, 4)
    param_attention: str = "qkvo"
    param_size: str = "small"
    mlp_dwconv: bool = False
    # --- JAX-side options -----------------------------------------------------------
    deform_settings: Optional[Sequence[Sequence[int]]] = None
    all_regions_topk: Optional[int] = None
    routing_ties: str = "torch"
    features_only: bool = False
    attn_impl: str = "auto"
    dwconv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def feature_info(self) -> tuple[dict[str, Any], ...]:
        return tuple(
            {"num_chs": c, "reduction": 4 * 2**i, "module": f"stages_{i}"} for i, c in enumerate(self.embed_dim)
        )

    def stage_settings(self) -> list[DeformSettings]:
        if self.deform_settings is not None:
            return [DeformSettings(*s) for s in per_stage(self.deform_settings, "deform_settings")]
        return [deform_settings(self.param_size, dim) for dim in self.embed_dim]

    def validate(self) -> None:
        for name in (
            "depth",
            "embed_dim",
            "kv_per_wins",
            "topks",
            "qk_dims",
            "kv_downsample_ratios",
            "kv_downsample_kernels",
            "mlp_ratios",
        ):
            per_stage(getattr(self, name), name)
        if self.representation_size:
            raise ValueError(
                "representation_size is not supported: the release's pre-logits layer is built with a "
                "list width and cannot run; leave it None."
            )
        if self.pe not in (None, "none"):
            raise ValueError(f"pe={self.pe!r}: the release only accepts None / 'none'.")
        regions = self.n_win * self.n_win
        if self.all_regions_topk is not None and not 0 < self.all_regions_topk <= regions:
            raise ValueError(
                f"all_regions_topk={self.all_regions_topk}: the topk -2 blocks route to between 1 and "
                f"n_win**2 = {regions} regions; use a value in that range or None for all of them."
            )
        for i, (dim, qk) in enumerate(zip(self.embed_dim, self.qk_dims)):
            check_block_topk(self.topks[i])
            qk = qk or dim
            if qk < self.head_dim or qk % self.head_dim:
                raise ValueError(
                    f"stage {i}: qk_dim {qk} is not a multiple of head_dim {self.head_dim}, so it cannot "
                    "be split into heads; choose head_dim dividing qk_dims."
                )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        self.validate()
        settings = self.stage_settings()
        check_nhwc_input(x, self.in_chans, "DeBiFormer")
        dt, pdt = self.dtype, self.param_dtype
        x = x.astype(dt)
        dp_rates = stochastic_depth_rates(self.drop_path_rate, self.depth)
        features, cur = [], 0
        for i in range(4):
            if i == 0:
                x = Stem(self.embed_dim[0], dt, pdt, name="downsample_layers_0")(x, train)
            else:
                x = Downsample(self.embed_dim[i], dt, pdt, name=f"downsample_layers_{i}")(x, train)
            # remat per stage, the release's use_checkpoint_stages; `train` is static.
            block_cls = (
                nn.remat(DeBiFormerBlock, static_argnums=(2,)) if i in self.use_checkpoint_stages else DeBiFormerBlock
            )
            qk_dim = self.qk_dims[i] or self.embed_dim[i]
            for j in range(self.depth[i]):
                x = block_cls(
                    dim=self.embed_dim[i],
                    drop_path=dp_rates[cur + j],
                    layer_scale_init_value=self.layer_scale_init_value,
                    num_heads=qk_dim // self.head_dim,
                    n_win=self.n_win,
                    qk_dim=qk_dim,
                    qk_scale=self.qk_scale,
                    kv_per_win=self.kv_per_wins[i],
                    kv_downsample_ratio=self.kv_downsample_ratios[i],
                    kv_downsample_mode=self.kv_downsample_mode,
                    topk=self.topks[i],
                    param_attention=self.param_attention,
                    param_routing=self.param_routing,
                    diff_routing=self.diff_routing,
                    soft_routing=self.soft_routing,
                    mlp_ratio=self.mlp_ratios[i],
                    param_size=self.param_size,
                    mlp_dwconv=self.mlp_dwconv,
                    side_dwconv=self.side_dwconv,
                    before_attn_dwconv=self.before_attn_dwconv,
                    pre_norm=self.pre_norm,
                    auto_pad=self.auto_pad,
                    settings=settings[i],
                    all_regions_topk=self.all_regions_topk,
                    routing_ties=self.routing_ties,
                    attn_impl=self.attn_impl,
                    dwconv_impl=self.dwconv_impl,
                    dtype=dt,
                    param_dtype=pdt,
                    name=f"stages_{i}_{j}",
                )(x, train)
            cur += self.depth[i]
            features.append(x)
        if self.features_only:
            return features
        x = BatchNorm(dtype=dt, param_dtype=pdt, name="norm")(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dt)  # (N, C)
        if self.num_classes > 0:
            x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
            # nn.Linear's own init: the release never re-initialises (its reset_parameters is a no-op).
            x = dense(self.num_classes, "head", dt, pdt, torch_init_fan_in=self.embed_dim[-1])(x)
        logits = x.astype(jnp.float32)
        return (logits, features) if return_features else logits


# The released variants (`debi_tiny` / `_small` / `_base`), drop_path_rate included.
_DEBIFORMER_COMMON = dict(
    n_win=7,
    kv_downsample_mode="identity",
    kv_per_wins=(-1, -1, -1, -1),
    topks=(4, 8, 16, -2),
    side_dwconv=5,
    before_attn_dwconv=3,
    layer_scale_init_value=-1,
    head_dim=32,
    param_routing=False,
    diff_routing=False,
    soft_routing=False,
    pre_norm=True,
    pe=None,
)

DEBIFORMER_VARIANTS: dict[str, dict[str, Any]] = {
    "debiformer_tiny": dict(
        _DEBIFORMER_COMMON,
        depth=(1, 1, 4, 1),
        embed_dim=(64, 128, 256, 512),
        qk_dims=(64, 128, 256, 512),
        mlp_ratios=(3, 3, 3, 3),
        param_size="tiny",
        drop_path_rate=0.0,
    ),
    "debiformer_small": dict(
        _DEBIFORMER_COMMON,
        depth=(2, 2, 9, 3),
        embed_dim=(64, 128, 256, 512),
        qk_dims=(64, 128, 256, 512),
        mlp_ratios=(3, 3, 3, 2),
        param_size="small",
        drop_path_rate=0.3,
    ),
    "debiformer_base": dict(
        _DEBIFORMER_COMMON,
        depth=(2, 2, 9, 2),
        embed_dim=(96, 192, 384, 768),
        qk_dims=(96, 192, 384, 768),
        mlp_ratios=(3, 3, 3, 3),
        param_size="base",
        drop_path_rate=0.4,
    ),
    # Test-only micro variant: every code path of the released blocks at 64x64 in seconds
    # (n_win 2: stage maps 16/8/4/2, one deformed point per region, topk -2 = all 4 regions).
    "debiformer_micro": dict(
        _DEBIFORMER_COMMON,
        depth=(1, 1, 1, 1),
        embed_dim=(16, 32, 64, 128),
        qk_dims=(16, 32, 64, 128),
        head_dim=8,
        n_win=2,
        topks=(4, 4, 4, -2),
        mlp_ratios=(3, 3, 3, 2),
        deform_settings=((1, 9, 8, 3, 16), (2, 7, 4, 3, 8), (4, 5, 2, 3, 4), (8, 3, 1, 1, 2)),
    ),
}
