"""Semantic FPN (Kirillov et al., 2019): mmsegmentation's `FPN` neck and `FPNHead`.

Ported from open-mmlab/mmsegmentation `mmseg/models/necks/fpn.py` and
`mmseg/models/decode_heads/fpn_head.py`, as the BiFormer / DeBiFormer configs use them:
`FPN(in_channels, out_channels=256, num_outs=4)` (no extra levels, no norm, no activation)
and `FPNHead(channels=128, feature_strides=(4, 8, 16, 32))`. NHWC maps throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from biformer_jax.models.layers import Dtype
from biformer_jax.models.segmentation.heads import ConvModule, check_head_init, cls_seg, kaiming_fan_out, xavier_uniform
from biformer_jax.ops.resize import resize_bilinear, resize_nearest


class FPN(nn.Module):
    """mmseg's `FPN` neck with as many outputs as inputs.

    Laterals are 1x1 convs (`lateral_convs_i`); the top-down path adds each level, resized
    by PyTorch's 'nearest' to the next lower level's size, into that level; `fpn_convs_i`
    (3x3) then make the outputs. Convs have a bias and neither norm nor activation; their
    kernels start Xavier-uniform (`head_init` 'init_weights') or kaiming-normal ('constructor').
    """

    out_channels: int = 256
    conv_impl: str = "auto"
    head_init: str = "init_weights"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        check_head_init(self.head_init)
        init = xavier_uniform if self.head_init == "init_weights" else kaiming_fan_out
        kw = dict(norm=False, kernel_init=init, conv_impl=self.conv_impl, dtype=self.dtype)
        kw["param_dtype"] = self.param_dtype
        laterals = [
            ConvModule(self.out_channels, 1, name=f"lateral_convs_{i}", **kw)(f) for i, f in enumerate(features)
        ]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_nearest(laterals[i], laterals[i - 1].shape[1:3])
        return [ConvModule(self.out_channels, 3, name=f"fpn_convs_{i}", **kw)(x) for i, x in enumerate(laterals)]


def scale_head_length(stride: int, first_stride: int) -> int:
    """How many conv (+ 2x upsample) steps bring a level of `stride` to `first_stride`."""
    return max(1, int(np.log2(stride) - np.log2(first_stride)))


class FPNHead(nn.Module):
    """mmseg's `FPNHead`: one scale head per level, summed at the finest level, `cls_seg`.

    Scale head i is mmseg's Sequential of ConvModule 3x3 (+ BatchNorm + ReLU) and, on all but
    the finest level, a 2x bilinear upsample after each conv; its entries are numbered as in
    that Sequential (`scale_heads_2_0`, `scale_heads_2_2`, ...). Each level is then resized
    (bilinear, align_corners=False) to the finest level's size and added.
    Output: (N, H/4, W/4, num_classes) float32 logits.
    """

    num_classes: int = 150
    channels: int = 128
    feature_strides: Sequence[int] = (4, 8, 16, 32)
    dropout_ratio: float = 0.1
    conv_impl: str = "auto"
    head_init: str = "init_weights"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool = False) -> jax.Array:
        strides = tuple(self.feature_strides)
        if len(strides) != len(features) or min(strides) != strides[0]:
            raise ValueError(
                f"FPNHead: feature_strides {strides} must give one stride per input level "
                f"({len(features)} levels), the finest first."
            )
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        output = None
        for i, x in enumerate(features):
            upsample = strides[i] != strides[0]
            for k in range(scale_head_length(strides[i], strides[0])):
                # Sequential index: conv at 2k (or k without upsampling), upsample after it.
                index = 2 * k if upsample else k
                x = ConvModule(self.channels, 3, name=f"scale_heads_{i}_{index}", **kw)(x, train)
                if upsample:
                    x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
            output = x if output is None else output + resize_bilinear(x, output.shape[1:3])
        return cls_seg(
            output, self.num_classes, self.dropout_ratio, train, self.dtype, self.param_dtype, self.head_init
        )
