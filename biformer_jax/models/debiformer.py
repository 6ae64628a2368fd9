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

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models import stages
from biformer_jax.models.deformable import ConvMlpWithDw, DeBiLevelRoutingAttention, DeformSettings, deform_settings
from biformer_jax.models.layers import DepthwiseConv2d, DropPath, Dtype, drop_path_keys, layer_norm, per_stage
from biformer_jax.models.routing import BiLevelRoutingAttention, RoutingSettings

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
    """One DeBiFormer block (the release's `Block`): two token mixers and two MLPs, NHWC.

    `routing` is the stage's (`routing.topk` is the block's, see BLOCK_TOPKS); the
    attentions always pad to the region grid, whatever `routing.auto_pad` says.
    Call: `block(x, train, drop_key=None)`, x (N, H, W, dim) -> (N, H, W, dim); `drop_key`
    (the stage loop passes one per block) seeds its four drop-path masks.
    """

    dim: int
    drop_path: float = 0.0
    layer_scale_init_value: float = -1.0
    mlp_ratio: float = 4
    param_size: str = "small"
    mlp_dwconv: bool = False  # accepted and unused, as in the release
    before_attn_dwconv: int = 3
    pre_norm: bool = True
    routing: RoutingSettings = RoutingSettings(topk_ties="torch")
    settings: Optional[DeformSettings] = None
    all_regions_topk: Optional[int] = None  # topk -2 routes to this many regions (None: n_win**2)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def routed(self, topk: int) -> RoutingSettings:
        # The release builds its BRA from nn.Linear and never re-initialises it (torch_init).
        if topk == -2:
            topk = self.all_regions_topk or self.routing.n_win**2
        return dataclasses.replace(self.routing, topk=topk, auto_pad=True, torch_init=True)

    def deformable(self, topk: int, name: str) -> DeBiLevelRoutingAttention:
        settings = self.settings if self.settings is not None else deform_settings(self.param_size, self.dim)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return DeBiLevelRoutingAttention(self.dim, self.routed(topk), self.param_size, settings, **kw)

    def token_mixers(self) -> tuple[nn.Module, nn.Module]:
        check_block_topk(self.routing.topk)
        k1, k2 = BLOCK_TOPKS[self.routing.topk]
        if k1 == -2:
            attn1 = self.deformable(k1, "attn1")
        else:
            kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="attn1")
            attn1 = BiLevelRoutingAttention(self.dim, self.routed(k1), **kw)
        return attn1, self.deformable(k2, "attn2")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, drop_key: Optional[jax.Array] = None) -> jax.Array:
        dt, pdt, c = self.dtype, self.param_dtype, self.dim
        if self.before_attn_dwconv not in (0, 3) and self.before_attn_dwconv > 0:
            raise ValueError(
                f"before_attn_dwconv={self.before_attn_dwconv}: the release's position-embedding conv pads "
                "by 1, which keeps the map size only for kernel 3; use 3 (or <= 0 for none)."
            )
        attn1, attn2 = self.token_mixers()
        impl = self.routing.dwconv_impl
        mlp1 = ConvMlpWithDw(c, self.mlp_ratio, impl, dt, pdt, name="mlp1")
        mlp2 = ConvMlpWithDw(c, self.mlp_ratio, impl, dt, pdt, name="mlp2")
        norm1, norm2, norm3, norm4 = (layer_norm(f"norm{i}", dt, pdt) for i in (1, 2, 3, 4))
        drop, keys = DropPath(self.drop_path), drop_path_keys(drop_key, 4)
        if self.layer_scale_init_value > 0:
            init = nn.initializers.constant(self.layer_scale_init_value)
            gammas = [self.param(f"gamma{i}", init, (c,), pdt).astype(dt) for i in (1, 2, 3, 4)]
        else:
            gammas = [None] * 4

        def scaled(i: int, y: jax.Array) -> jax.Array:
            return drop(y if gammas[i] is None else gammas[i] * y, train, keys[i])

        def pos_embed(name: str, y: jax.Array) -> jax.Array:
            if self.before_attn_dwconv <= 0:  # the release crashes here (pos_embed1 undefined)
                return y
            conv = DepthwiseConv2d(3, padding=1, impl=impl, dtype=dt, param_dtype=pdt, name=name)
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
    may be None (the stage width); `features_only`, `scan_blocks`, `scan_remat`, `bn_group_size`, `attn_impl`,
    `dwconv_impl`, `dtype` and `param_dtype` as in `BiFormer`; `drop_rate` is dropout before the classifier (the release
    ignores it). `auto_pad` is accepted and has no effect: the attention always pads to the
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
    # How many regions the topk -2 blocks route to (None: all n_win**2; the released
    # segmentation backbone hard-codes 49, i.e. 49 of 64 at n_win 8).
    all_regions_topk: Optional[int] = None
    routing_ties: str = "torch"
    features_only: bool = False
    scan_blocks: bool = False  # one lax.scan per stage over its blocks, train and inference (stages.run_stages)
    scan_remat: str = "none"  # what a scanned training block keeps for backward (stages.SCAN_REMAT)
    bn_group_size: int = 0  # train: BatchNorm statistics per this many images (DDP's per GPU); 0: the batch
    attn_impl: str = "auto"
    dwconv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def feature_info(self) -> tuple[dict[str, Any], ...]:
        return stages.feature_info(self.embed_dim)

    def stage_settings(self) -> list[DeformSettings]:
        if self.deform_settings is not None:
            return [DeformSettings(*s) for s in per_stage(self.deform_settings, "deform_settings")]
        return [deform_settings(self.param_size, dim) for dim in self.embed_dim]

    def validate(self) -> None:
        stages.check_official_args(self, "the release")
        regions = self.n_win * self.n_win
        if self.all_regions_topk is not None and not 0 < self.all_regions_topk <= regions:
            raise ValueError(
                f"all_regions_topk={self.all_regions_topk}: the topk -2 blocks route to between 1 and "
                f"n_win**2 = {regions} regions; use a value in that range or None for all of them."
            )
        for i in range(4):
            check_block_topk(self.topks[i])
            stages.check_head_split(self, [i])

    def stage_kwargs(self, i: int) -> dict[str, Any]:
        return dict(
            param_size=self.param_size,
            routing=stages.stage_routing(self, i, topk_ties=self.routing_ties),
            settings=self.stage_settings()[i],
            all_regions_topk=self.all_regions_topk,
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        self.validate()
        self.stage_settings()  # a clear error for widths without settings before any module is built
        # nn.Linear's own init for the head: the release never re-initialises (its reset_parameters is a no-op).
        return stages.forward(self, x, train, return_features, DeBiFormerBlock, self.stage_kwargs, self.embed_dim[-1])


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
