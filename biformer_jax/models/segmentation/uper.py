"""UperNet (Xiao et al., 2018): mmsegmentation's `UPerHead` with its pyramid pooling module.

Ported from open-mmlab/mmsegmentation `mmseg/models/decode_heads/uper_head.py` and
`psp_head.py` (`PPM`), as the BiFormer / DeBiFormer configs use them:
`UPerHead(in_channels, channels=512, pool_scales=(1, 2, 3, 6))`. NHWC maps throughout;
every resize is bilinear with align_corners=False and no antialiasing, and the pooling is
`nn.AdaptiveAvgPool2d`'s (overlapping bins when the scale does not divide the map).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models.layers import Dtype
from biformer_jax.models.segmentation.heads import ConvModule, cls_seg
from biformer_jax.ops.resize import adaptive_avg_pool, resize_bilinear


class UPerHead(nn.Module):
    """mmseg's `UPerHead`.

    The last level goes through the PPM (`psp_modules_k_1`: adaptive average pooling to each
    pool scale, 1x1 ConvModule, bilinear resize back), is concatenated after its input and
    fused by the 3x3 `bottleneck`; the other levels get 1x1 `lateral_convs_i`. The top-down
    path adds each level, bilinearly resized, into the next finer one; 3x3 `fpn_convs_i`
    follow (the PPM level is used as is); all levels are resized to the finest, concatenated
    finest first and fused by the 3x3 `fpn_bottleneck`; then `cls_seg`.
    Output: (N, H/4, W/4, num_classes) float32 logits.
    """

    num_classes: int = 150
    channels: int = 512
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dropout_ratio: float = 0.1
    conv_impl: str = "auto"
    head_init: str = "init_weights"  # conv_seg's initial values (heads.py)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _conv(self, kernel_size: int, name: str) -> ConvModule:
        return ConvModule(
            self.channels,
            kernel_size,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def psp_forward(self, x: jax.Array, train: bool) -> jax.Array:
        outs = [x.astype(self.dtype)]
        for k, scale in enumerate(self.pool_scales):
            y = self._conv(1, f"psp_modules_{k}_1")(adaptive_avg_pool(x, (scale, scale)), train)
            outs.append(resize_bilinear(y, x.shape[1:3]))
        return self._conv(3, "bottleneck")(jnp.concatenate(outs, axis=-1), train)  # (N, h, w, channels)

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], train: bool = False) -> jax.Array:
        laterals = [self._conv(1, f"lateral_convs_{i}")(f, train) for i, f in enumerate(features[:-1])]
        laterals.append(self.psp_forward(features[-1], train))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
        outs = [self._conv(3, f"fpn_convs_{i}")(x, train) for i, x in enumerate(laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[1:3]
        outs = [outs[0]] + [resize_bilinear(x, size) for x in outs[1:]]
        y = self._conv(3, "fpn_bottleneck")(jnp.concatenate(outs, axis=-1), train)  # (N, H/4, W/4, channels)
        return cls_seg(y, self.num_classes, self.dropout_ratio, train, self.dtype, self.param_dtype, self.head_init)
