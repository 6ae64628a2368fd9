"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023).

Ported from rayleizhu/BiFormer `models/biformer.py` (commit 1697bbb). NHWC in, logits out.
A conv stem (two 3x3/2 convs) and three 3x3/2 downsampling convs, each followed by
BatchNorm, feed four stages of blocks; the token mixer of a stage is chosen by its topk:
> 0 bi-level routing attention, -1 global attention, -2 global attention with LePE, 0 a
depthwise-conv pseudo attention. A final BatchNorm, global average pooling and a Linear
head give the logits. Module names follow the official state_dict (`downsample_layers_0`
holds `0`, `1`, `3`, `4` as `downsample_layers.0.{0,1,3,4}`; block j of stage i is
`stages_i_j`), which is what lets `biformer_jax.convert` map checkpoints by rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from biformer_jax.models.attention import Attention, AttentionLePE, PseudoAttention
from biformer_jax.models.layers import (
    BatchNorm,
    ConvMlp,
    DepthwiseConv2d,
    DropPath,
    Dtype,
    check_nhwc_input,
    conv2d,
    dense,
    gelu,
    layer_norm,
    per_stage,
)
from biformer_jax.models.routing import BiLevelRoutingAttention


class Block(nn.Module):
    """One BiFormer block: conv position embedding, token mixer, MLP (pre- or post-norm)."""

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
    mlp_dwconv: bool = False
    side_dwconv: int = 5
    before_attn_dwconv: int = 3
    pre_norm: bool = True
    auto_pad: bool = False
    routing_ties: str = "xla"
    attn_impl: str = "auto"
    dwconv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def token_mixer(self) -> nn.Module:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="attn")
        if self.topk > 0:
            return BiLevelRoutingAttention(
                dim=self.dim,
                num_heads=self.num_heads,
                n_win=self.n_win,
                qk_dim=self.qk_dim,
                qk_scale=self.qk_scale,
                kv_per_win=self.kv_per_win,
                kv_downsample_ratio=self.kv_downsample_ratio,
                kv_downsample_mode=self.kv_downsample_mode,
                topk=self.topk,
                param_attention=self.param_attention,
                param_routing=self.param_routing,
                diff_routing=self.diff_routing,
                soft_routing=self.soft_routing,
                side_dwconv=self.side_dwconv,
                auto_pad=self.auto_pad,
                topk_ties=self.routing_ties,
                attn_impl=self.attn_impl,
                dwconv_impl=self.dwconv_impl,
                **kw,
            )
        if self.topk == -1:
            return Attention(dim=self.dim, **kw)
        if self.topk == -2:
            return AttentionLePE(dim=self.dim, side_dwconv=self.side_dwconv, dwconv_impl=self.dwconv_impl, **kw)
        if self.topk == 0:
            return PseudoAttention(dim=self.dim, dwconv_impl=self.dwconv_impl, **kw)
        raise ValueError(
            f"topk={self.topk} is not a valid token mixer: use topk > 0 (routing attention), -1 "
            "(global attention), -2 (global attention with LePE) or 0 (conv pseudo attention)."
        )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        if self.before_attn_dwconv > 0:
            # The official conv uses padding=1, i.e. "same" only for the 3x3 it ships with.
            x = x + DepthwiseConv2d(
                self.before_attn_dwconv,
                padding=1,
                impl=self.dwconv_impl,
                dtype=dt,
                param_dtype=pdt,
                name="pos_embed",
            )(x)
        attn = self.token_mixer()
        mlp = ConvMlp(int(self.mlp_ratio * self.dim), self.dim, self.mlp_dwconv, self.dwconv_impl, dt, pdt, name="mlp")
        norm1, norm2 = layer_norm("norm1", dt, pdt), layer_norm("norm2", dt, pdt)
        drop = DropPath(self.drop_path)
        if self.layer_scale_init_value > 0:
            init = nn.initializers.constant(self.layer_scale_init_value)
            g1 = self.param("gamma1", init, (self.dim,), pdt).astype(dt)
            g2 = self.param("gamma2", init, (self.dim,), pdt).astype(dt)
        else:
            g1 = g2 = None

        def scaled(g, y):
            return y if g is None else g * y

        if self.pre_norm:
            # BRA fuses norm1 into its qkv Linear; the other token mixers take norm1(x).
            fused = isinstance(attn, BiLevelRoutingAttention)
            x = x + drop(scaled(g1, attn(x, norm=norm1) if fused else attn(norm1(x))), train)
            x = x + drop(scaled(g2, mlp(x, norm=norm2)), train)
        else:
            x = norm1(x + drop(scaled(g1, attn(x)), train))
            x = norm2(x + drop(scaled(g2, mlp(x)), train))
        return x


class Stem(nn.Module):
    """conv3x3/2 -> BN -> GELU -> conv3x3/2 -> BN (official downsample_layers.0)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt, pdt, half = self.dtype, self.param_dtype, self.dim // 2
        x = conv2d(half, 3, x.shape[-1], "0", dt, pdt, stride=2, padding=1)(x)
        x = gelu(BatchNorm(dtype=dt, param_dtype=pdt, name="1")(x, train))
        x = conv2d(self.dim, 3, half, "3", dt, pdt, stride=2, padding=1)(x)
        return BatchNorm(dtype=dt, param_dtype=pdt, name="4")(x, train)


class Downsample(nn.Module):
    """conv3x3/2 -> BN between stages (official downsample_layers.1-3)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv2d(self.dim, 3, x.shape[-1], "0", self.dtype, self.param_dtype, stride=2, padding=1)(x)
        return BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="1")(x, train)


def stochastic_depth_rates(drop_path_rate: float, depth: Sequence[int]) -> list[float]:
    """torch.linspace(0, rate, sum(depth)) as the official code computes it (float32)."""
    return [float(r) for r in np.linspace(0.0, drop_path_rate, sum(depth), dtype=np.float32)]


class BiFormer(nn.Module):
    """The official `BiFormer` constructor: same argument names and defaults.

    Extensions: `qk_dims` entries may be None (meaning the stage width), `dtype` is the
    compute dtype, `attn_impl` / `dwconv_impl` pick implementations of the same function,
    `features_only` makes the model a backbone returning the four stage maps,
    `drop_rate` is dropout before the classifier (the official constructor ignores it), and
    `routing_ties` ('xla' or 'torch') is how the routers break exact score ties, which
    regions made only of auto_pad padding produce: 'torch' picks the regions the official
    code picks on CPU (see `DeBiFormer`), 'xla' is faster; the outputs are the same.

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
    routing_ties: str = "xla"
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
                "representation_size is not supported: the official BiFormer's pre-logits layer is "
                "built with a list width and cannot run; leave it None."
            )
        if self.pe not in (None, "none"):
            raise ValueError(f"pe={self.pe!r}: the official code only accepts None / 'none'.")
        for i, (dim, qk) in enumerate(zip(self.embed_dim, self.qk_dims)):
            qk = qk or dim
            if self.topks[i] > 0 and (qk < self.head_dim or qk % self.head_dim):
                raise ValueError(
                    f"stage {i}: qk_dim {qk} is not a multiple of head_dim {self.head_dim}, so it "
                    "cannot be split into heads; choose head_dim dividing qk_dims."
                )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        self.validate()
        check_nhwc_input(x, self.in_chans, "BiFormer")
        dt, pdt = self.dtype, self.param_dtype
        x = x.astype(dt)
        dp_rates = stochastic_depth_rates(self.drop_path_rate, self.depth)
        block_cls = Block
        features, cur = [], 0
        for i in range(4):
            if i == 0:
                x = Stem(self.embed_dim[0], dt, pdt, name="downsample_layers_0")(x, train)
            else:
                x = Downsample(self.embed_dim[i], dt, pdt, name=f"downsample_layers_{i}")(x, train)
            # remat per stage, the official use_checkpoint_stages; `train` is static.
            block_cls = nn.remat(Block, static_argnums=(2,)) if i in self.use_checkpoint_stages else Block
            qk_dim = self.qk_dims[i] or self.embed_dim[i]
            for j in range(self.depth[i]):
                x = block_cls(
                    dim=self.embed_dim[i],
                    drop_path=dp_rates[cur + j],
                    layer_scale_init_value=self.layer_scale_init_value,
                    topk=self.topks[i],
                    num_heads=qk_dim // self.head_dim,
                    n_win=self.n_win,
                    qk_dim=qk_dim,
                    qk_scale=self.qk_scale,
                    kv_per_win=self.kv_per_wins[i],
                    kv_downsample_ratio=self.kv_downsample_ratios[i],
                    kv_downsample_mode=self.kv_downsample_mode,
                    param_attention=self.param_attention,
                    param_routing=self.param_routing,
                    diff_routing=self.diff_routing,
                    soft_routing=self.soft_routing,
                    mlp_ratio=self.mlp_ratios[i],
                    mlp_dwconv=self.mlp_dwconv,
                    side_dwconv=self.side_dwconv,
                    before_attn_dwconv=self.before_attn_dwconv,
                    pre_norm=self.pre_norm,
                    auto_pad=self.auto_pad,
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
            x = dense(self.num_classes, "head", dt, pdt)(x)
        logits = x.astype(jnp.float32)
        return (logits, features) if return_features else logits


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
