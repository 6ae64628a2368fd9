"""mmdetection 2.11's `RetinaHead` (Lin et al., 2017), shared by all levels, on NHWC maps.

Ported from mmdet `models/dense_heads/retina_head.py`: per branch `stacked_convs` x (3x3 conv +
bias + ReLU; `cls_convs_i`, `reg_convs_i`), then `retina_cls` (3x3, A * C channels, sigmoid
classes: no background) and `retina_reg` (3x3, A * 4). Channel `a * C + c` of a level's class
map is anchor a, class c; `a * 4 + j` of its box map is anchor a's delta j (dx, dy, dw, dh).
Init as mmdet's: every conv normal(0, 0.01) with zero bias, except `retina_cls`'s bias
`-log((1 - 0.01) / 0.01)` (prior probability 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models.detection.fpn import Conv2d, ConvModule
from biformer_jax.models.layers import Dtype

head_init = nn.initializers.normal(0.01)


def bias_init_with_prob(prior_prob: float) -> float:
    """mmcv's `bias_init_with_prob`: the logit of `prior_prob`."""
    return float(-math.log((1 - prior_prob) / prior_prob))


class RetinaHead(nn.Module):
    """Input: the neck's maps; output `(cls_scores, bbox_preds)`, per level (N, H, W, A * C) and
    (N, H, W, A * 4) float32."""

    num_classes: int = 80
    num_anchors: int = 9
    feat_channels: int = 256
    stacked_convs: int = 4
    prior_prob: float = 0.01
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        kw = dict(kernel_init=head_init, dtype=self.dtype, param_dtype=self.param_dtype)
        cls_convs = [
            ConvModule(self.feat_channels, 3, relu=True, name=f"cls_convs_{i}", **kw) for i in range(self.stacked_convs)
        ]
        reg_convs = [
            ConvModule(self.feat_channels, 3, relu=True, name=f"reg_convs_{i}", **kw) for i in range(self.stacked_convs)
        ]
        cls_bias = nn.initializers.constant(bias_init_with_prob(self.prior_prob))
        retina_cls = Conv2d(self.num_anchors * self.num_classes, 3, bias_init=cls_bias, name="retina_cls", **kw)
        retina_reg = Conv2d(self.num_anchors * 4, 3, name="retina_reg", **kw)
        cls_scores, bbox_preds = [], []
        for x in feats:
            c = r = x
            for conv in cls_convs:
                c = conv(c)
            for conv in reg_convs:
                r = conv(r)
            cls_scores.append(retina_cls(c).astype(jnp.float32))
            bbox_preds.append(retina_reg(r).astype(jnp.float32))
        return cls_scores, bbox_preds
