"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023).

Ported from rayleizhu/BiFormer `models/biformer.py` (commit 1697bbb). NHWC in, logits out.
A conv stem (two 3x3/2 convs) and three 3x3/2 downsampling convs, each followed by
BatchNorm, feed four stages of blocks; the token mixer of a stage is chosen by its topk:
> 0 bi-level routing attention, -1 global attention, -2 global attention with LePE, 0 a
depthwise-conv pseudo attention. A final BatchNorm, global average pooling and a Linear
head give the logits. The stem, stage loop and head are `stages`' (shared with DeBiFormer);
module names follow the official state_dict, which is what lets `biformer_jax.convert`
map checkpoints by rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models import stages
from biformer_jax.models.attention import Attention, AttentionLePE, PseudoAttention
from biformer_jax.models.layers import (
    ConvMlp,
    DepthwiseConv2d,
    DropPath,
    Dtype,
    LayerNormParams,
    drop_path_keys,
    layer_norm,
)
from biformer_jax.models.routing import BiLevelRoutingAttention, RoutingSettings


class Block(nn.Module):
    """One BiFormer block: conv position embedding, token mixer, MLP (pre- or post-norm).

    The stage's routing settings (`routing.topk` also picks the token mixer) come from the
    model; with pre-norm, BRA and the MLP apply norm1 / norm2 fused into their first Linear.
    Call: `block(x, train, drop_key=None)`, x (N, H, W, dim) -> (N, H, W, dim); `drop_key`
    (the stage loop passes one per block) seeds its two drop-path masks.
    """

    dim: int
    drop_path: float = 0.0
    layer_scale_init_value: float = -1.0
    mlp_ratio: float = 4
    mlp_dwconv: bool = False
    before_attn_dwconv: int = 3
    pre_norm: bool = True
    routing: RoutingSettings = RoutingSettings()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def token_mixer(self, norm: Optional[LayerNormParams]) -> nn.Module:
        r, kw = self.routing, dict(dtype=self.dtype, param_dtype=self.param_dtype, name="attn")
        if r.topk > 0:
            return BiLevelRoutingAttention(self.dim, r, norm=norm, **kw)
        if r.topk == -1:
            return Attention(dim=self.dim, **kw)
        if r.topk == -2:
            return AttentionLePE(dim=self.dim, side_dwconv=r.side_dwconv, dwconv_impl=r.dwconv_impl, **kw)
        if r.topk == 0:
            return PseudoAttention(dim=self.dim, dwconv_impl=r.dwconv_impl, **kw)
        raise ValueError(
            f"topk={r.topk} is not a valid token mixer: use topk > 0 (routing attention), -1 "
            "(global attention), -2 (global attention with LePE) or 0 (conv pseudo attention)."
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, drop_key: Optional[jax.Array] = None) -> jax.Array:
        dt, pdt, impl = self.dtype, self.param_dtype, self.routing.dwconv_impl
        if self.before_attn_dwconv > 0:
            # The official conv uses padding=1, i.e. "same" only for the 3x3 it ships with.
            pos_embed = DepthwiseConv2d(
                self.before_attn_dwconv, padding=1, impl=impl, dtype=dt, param_dtype=pdt, name="pos_embed"
            )
            x = x + pos_embed(x)
        hidden = int(self.mlp_ratio * self.dim)
        drop, (k1, k2) = DropPath(self.drop_path), drop_path_keys(drop_key, 2)
        if self.layer_scale_init_value > 0:
            init = nn.initializers.constant(self.layer_scale_init_value)
            g1 = self.param("gamma1", init, (self.dim,), pdt).astype(dt)
            g2 = self.param("gamma2", init, (self.dim,), pdt).astype(dt)
        else:
            g1 = g2 = None

        def scaled(g, y):
            return y if g is None else g * y

        if self.pre_norm:
            # BRA and the MLP apply their pre-norm fused into their first Linear (NormDense);
            # the other token mixers take norm1(x).
            fused = self.routing.topk > 0
            norm1 = LayerNormParams(param_dtype=pdt, name="norm1") if fused else layer_norm("norm1", dt, pdt)
            attn = self.token_mixer(norm1 if fused else None)
            mlp = ConvMlp(
                hidden,
                self.dim,
                self.mlp_dwconv,
                impl,
                dt,
                pdt,
                LayerNormParams(param_dtype=pdt, name="norm2"),
                name="mlp",
            )
            x = x + drop(scaled(g1, attn(x) if fused else attn(norm1(x))), train, k1)
            return x + drop(scaled(g2, mlp(x)), train, k2)
        attn, mlp = self.token_mixer(None), ConvMlp(hidden, self.dim, self.mlp_dwconv, impl, dt, pdt, name="mlp")
        norm1, norm2 = layer_norm("norm1", dt, pdt), layer_norm("norm2", dt, pdt)
        x = norm1(x + drop(scaled(g1, attn(x)), train, k1))
        return norm2(x + drop(scaled(g2, mlp(x)), train, k2))


class BiFormer(nn.Module):
    """The official `BiFormer` constructor: same argument names and defaults.

    Extensions: `qk_dims` entries may be None (meaning the stage width), `dtype` is the
    compute dtype, `attn_impl` / `dwconv_impl` pick implementations of the same function,
    `features_only` makes the model a backbone returning the four stage maps,
    `scan_blocks` runs each stage's blocks as one `lax.scan` in training and at inference
    (`scan_remat`: the scanned training body's rematerialisation; see `stages.run_stages`;
    the weights keep their per-block layout), `drop_rate` is dropout before the classifier (the
    official constructor ignores it), and `bn_group_size` > 0 normalises the BatchNorms in training
    over groups of that many images, as plain BatchNorm under DDP with that many per GPU
    (`layers.BatchNorm`; 0: the whole batch, i.e. SyncBN).

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
    mlp_dwconv: bool = False
    # --- JAX-side options -----------------------------------------------------------
    routing_ties: str = "xla"  # the routers' exact-tie order ('xla' | 'torch'), biformer_jax.ops.topk
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

    def validate(self) -> None:
        stages.check_official_args(self, "the official BiFormer")
        stages.check_head_split(self, [i for i in range(4) if self.topks[i] > 0])

    def stage_kwargs(self, i: int) -> dict[str, Any]:
        return dict(routing=stages.stage_routing(self, i, topk_ties=self.routing_ties))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        self.validate()
        return stages.forward(self, x, train, return_features, Block, self.stage_kwargs)


# The official variants (`biformer_tiny` / `_small` / `_base` in models/biformer.py).
_BIFORMER_COMMON = dict(
    n_win=7,
    kv_downsample_mode="identity",
    kv_per_wins=(-1, -1, -1, -1),
    topks=(1, 4, 16, -2),
    side_dwconv=5,
    before_attn_dwconv=3,
    layer_scale_init_value=-1,
    head_dim=32,
    param_routing=False,
    diff_routing=False,
    soft_routing=False,
    pre_norm=True,
    pe=None,
    mlp_ratios=(3, 3, 3, 3),
)

BIFORMER_VARIANTS: dict[str, dict[str, Any]] = {
    "biformer_tiny": dict(
        _BIFORMER_COMMON, depth=(2, 2, 8, 2), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512)
    ),
    "biformer_small": dict(
        _BIFORMER_COMMON, depth=(4, 4, 18, 4), embed_dim=(64, 128, 256, 512), qk_dims=(64, 128, 256, 512)
    ),
    "biformer_base": dict(
        _BIFORMER_COMMON, depth=(4, 4, 18, 4), embed_dim=(96, 192, 384, 768), qk_dims=(96, 192, 384, 768)
    ),
    # Test-only micro variant: every code path of the tiny model at 64x64 in seconds.
    "biformer_micro": dict(
        _BIFORMER_COMMON,
        depth=(1, 1, 2, 1),
        embed_dim=(16, 32, 64, 128),
        qk_dims=(16, 32, 64, 128),
        head_dim=8,
        n_win=2,
        topks=(1, 2, 2, -2),
    ),
}
