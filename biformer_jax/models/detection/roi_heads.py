"""mmdetection 2.11's `StandardRoIHead` parts of Mask R-CNN: `Shared2FCBBoxHead`, `FCNMaskHead`,
their RoI feature extraction (`SingleRoIExtractor` + mmcv `RoIAlign`), and mask pasting.

Ported from mmdet `models/roi_heads/bbox_heads/convfc_bbox_head.py` (`Shared2FCBBoxHead`: the
RoI features flattened in PyTorch's (C, H, W) order, `shared_fcs_0/1` (1024 + ReLU each), then
`fc_cls` (C + 1 logits, the last one background) and `fc_reg` (C * 4 class-specific deltas,
class-major)), `mask_heads/fcn_mask_head.py` (`FCNMaskHead`: 4 x (3x3 conv + ReLU, `convs_i/conv`),
`upsample` = `ConvTranspose2d(k=2, stride=2)` + ReLU, 1x1 `conv_logits` to C maps; pasting:
`_do_paste_mask` on the CPU path; its targets: `mask_target`, `BitmapMasks.crop_and_resize`)
and `roi_extractors/single_level_roi_extractor.py`.

Init as mmdet's: shared fcs xavier-uniform, `fc_cls` normal(0, 0.01), `fc_reg` normal(0, 0.001),
mask convs kaiming-normal (fan_out, ReLU), zero biases.

Layout note for checkpoints: `upsample/kernel` is (2, 2, out, in), the transpose of PyTorch's
`ConvTranspose2d.weight` (in, out, 2, 2) under the converter's 4-D kernel rule, so
`biformer_jax.convert` maps `roi_head.mask_head.upsample.weight` by rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.detection.roi_align import multi_level_roi_align, roi_align
from biformer_jax.models.detection.fpn import Conv2d, ConvModule
from biformer_jax.models.layers import Dtype

xavier_uniform = nn.initializers.xavier_uniform()
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def extract_roi_features(
    feats: Sequence[jax.Array], rois: jax.Array, output_size: int, strides: Sequence[int], finest_scale: float = 56.0
) -> jax.Array:
    """Per image RoI features: feats per level (N, H_l, W_l, C), rois (N, R, 4) -> (N, R, out, out, C).

    A loop over the images (`lax.map`), not `vmap`: each RoI picks its window with `lax.switch`,
    which `vmap` would turn into running every branch (biformer_jax.detection.roi_align)."""
    feats = tuple(feats[: len(strides)])
    return jax.lax.map(lambda a: multi_level_roi_align(a[0], a[1], output_size, strides, finest_scale), (feats, rois))


class Shared2FCBBoxHead(nn.Module):
    """(R, 7, 7, C) RoI features -> (cls_score (R, C + 1), bbox_pred (R, C * 4)), float32."""

    num_classes: int = 80
    fc_channels: int = 1024
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # PyTorch's flatten of (C, H, W)
        for i in range(2):
            x = nn.relu(nn.Dense(self.fc_channels, kernel_init=xavier_uniform, name=f"shared_fcs_{i}", **kw)(x))
        cls = nn.Dense(self.num_classes + 1, kernel_init=nn.initializers.normal(0.01), name="fc_cls", **kw)(x)
        reg = nn.Dense(self.num_classes * 4, kernel_init=nn.initializers.normal(0.001), name="fc_reg", **kw)(x)
        return cls.astype(jnp.float32), reg.astype(jnp.float32)


class ConvTranspose2x2(nn.Module):
    """`nn.ConvTranspose2d(in, features, 2, stride=2)`: (N, H, W, in) -> (N, 2H, 2W, features);
    `kernel` (2, 2, features, in) (see the module on the layout), `bias`."""

    features: int
    kernel_init: nn.initializers.Initializer = kaiming_fan_out
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (2, 2, self.features, x.shape[-1]), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        n, h, w, _ = x.shape
        y = jnp.einsum("nijc,aboc->niajbo", x.astype(self.dtype), kernel.astype(self.dtype))
        return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class FCNMaskHead(nn.Module):
    """(R, 14, 14, C) RoI features -> (R, 28, 28, num_classes) mask logits, float32."""

    num_classes: int = 80
    num_convs: int = 4
    conv_channels: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_convs):
            x = ConvModule(self.conv_channels, 3, relu=True, kernel_init=kaiming_fan_out, name=f"convs_{i}", **kw)(x)
        x = nn.relu(ConvTranspose2x2(self.conv_channels, name="upsample", **kw)(x))
        return Conv2d(self.num_classes, 1, kernel_init=kaiming_fan_out, name="conv_logits", **kw)(x).astype(jnp.float32)


class RoIHead(nn.Module):
    """`roi_head`: `bbox_head` and `mask_head` with their RoI extractors (mmdet's module names)."""

    num_classes: int = 80
    fc_channels: int = 1024
    mask_convs: int = 4
    mask_channels: int = 256
    strides: tuple[int, ...] = (4, 8, 16, 32)
    bbox_roi_size: int = 7
    mask_roi_size: int = 14
    finest_scale: float = 56.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.bbox_head = Shared2FCBBoxHead(self.num_classes, self.fc_channels, **kw)
        self.mask_head = FCNMaskHead(self.num_classes, self.mask_convs, self.mask_channels, **kw)

    def bbox_forward(self, feats: Sequence[jax.Array], rois: jax.Array) -> tuple[jax.Array, jax.Array]:
        """feats per level (N, H_l, W_l, C), rois (N, R, 4) -> (N * R, C + 1), (N * R, C * 4)."""
        x = extract_roi_features(feats, rois, self.bbox_roi_size, self.strides, self.finest_scale)
        return self.bbox_head(x.reshape(-1, *x.shape[2:]))

    def mask_forward(self, feats: Sequence[jax.Array], rois: jax.Array) -> jax.Array:
        """feats per level, rois (N, R, 4) -> (N, R, 28, 28, num_classes) logits."""
        x = extract_roi_features(feats, rois, self.mask_roi_size, self.strides, self.finest_scale)
        n, r = x.shape[:2]
        logits = self.mask_head(x.reshape(n * r, *x.shape[2:]))
        return logits.reshape(n, r, *logits.shape[1:])

    def __call__(self, feats: Sequence[jax.Array], rois: jax.Array):
        return self.bbox_forward(feats, rois), self.mask_forward(feats, rois)


def _paste_axis(lo: jax.Array, hi: jax.Array, length: int, limit, mask_size: int):
    """One axis of `_do_paste_mask` on a canvas of `length` pixels for an image of `limit` (may be
    traced): ((length, mask_size) bilinear weights of grid_sample with align_corners=False and zero
    padding at the pixel centres, (length,) bool window)."""
    f32 = jnp.float32
    start = jnp.maximum(jnp.floor(lo) - 1, 0).astype(jnp.int32)
    stop = jnp.minimum(jnp.ceil(hi) + 1, jnp.asarray(limit, f32)).astype(jnp.int32)
    pixels = jnp.arange(length, dtype=jnp.int32)
    centres = pixels.astype(f32) + f32(0.5)
    g = (centres - lo) / (hi - lo) * f32(2) - f32(1)
    g = jnp.where(jnp.isinf(g), f32(0), g)  # mmdet sets infinite grid values (zero-size boxes) to 0
    pos = ((g + f32(1)) * f32(mask_size) - f32(1)) / f32(2)  # grid_sample's unnormalise, align_corners=False
    low = jnp.floor(pos)
    cells = jnp.arange(mask_size, dtype=f32)
    # torch's weights: (low + 1 - pos) for the lower cell, (pos - low) for the upper one
    weights = (low + 1 - pos)[:, None] * (low[:, None] == cells) + (pos - low)[:, None] * ((low + 1)[:, None] == cells)
    return weights, (pixels >= start) & (pixels < stop)


def paste_masks(
    probs: jax.Array, boxes: jax.Array, height: int, width: int, threshold: float = 0.5, image_size=None
) -> jax.Array:
    """mmdet's `get_seg_masks` pasting (CPU path, `skip_empty`): probs (K, M, M) in [0, 1], boxes
    (K, 4) -> (K, height, width) bool, `value >= threshold` within
    `[max(floor(x1) - 1, 0), min(ceil(x2) + 1, W))` (and likewise in y), False elsewhere.
    `image_size` (2,) (h, w), may be traced: the image within the canvas (default: the canvas).

    Static shapes: each mask is computed over the whole canvas and windowed, and the bilinear
    sampling factorises (`Ry @ M @ Rx^T`), equal to grid_sample up to float summation order.
    """
    m = probs.shape[-1]
    limit_h, limit_w = (height, width) if image_size is None else (image_size[0], image_size[1])

    def one(p, box):
        ry, wy = _paste_axis(box[1], box[3], height, limit_h, m)  # (H, M), (H,)
        rx, wx = _paste_axis(box[0], box[2], width, limit_w, m)  # (W, M), (W,)
        value = jnp.einsum("yi,ij,xj->yx", ry, p.astype(jnp.float32), rx)
        return (value >= jnp.float32(threshold)) & wy[:, None] & wx[None, :]

    return jax.vmap(one)(probs, boxes)


def mask_targets(gt_masks: jax.Array, rois: jax.Array, gt_index: jax.Array, mask_size: int = 28) -> jax.Array:
    """mmdet's `BitmapMasks.crop_and_resize` of one image: (G, H, W) masks, (K, 4) rois, (K,) index
    of each roi's ground truth -> (K, M, M) float {0, 1}: RoIAlign (scale 1, aligned) of the mask, >= 0.5."""

    def one(args):
        roi, g = args
        m = jax.lax.dynamic_index_in_dim(gt_masks, g, keepdims=False).astype(jnp.float32)[..., None]
        return roi_align(m, roi[None], mask_size, 1.0, windows=())[0, ..., 0]  # dense: run under vmap

    return (jax.lax.map(one, (rois, gt_index)) >= 0.5).astype(jnp.float32)
