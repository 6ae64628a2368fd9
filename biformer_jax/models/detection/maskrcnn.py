"""Mask R-CNN (He et al., ICCV 2017) on BiFormer / DeBiFormer, as the official detection configs build it.

The model of rayleizhu/BiFormer `object_detection/configs/coco/maskrcnn.1x.biformer_{small,base}.py`
(vendored mmdetection 2.11, `_base_/models/mask_rcnn_r50_fpn.py` with `BiFormer_mm`): backbone +
`FPN(start_level=0, num_outs=5)` (P6 = `max_pool2d(P5, 1, stride=2)`) + `RPNHead` (anchors scale
8, ratios 0.5/1/2, strides 4-64) + `StandardRoIHead` (`SingleRoIExtractor` with RoIAlign 7 / 14,
`Shared2FCBBoxHead`, `FCNMaskHead`). Submodules are named as an mmdet checkpoint names them
(`backbone`, `neck`, `rpn_head`, `roi_head.bbox_head`, `roi_head.mask_head`), so
`biformer_jax.convert.from_torch_state_dict` maps every key by rule.

Entry points (stable):

    model = models.create_model("maskrcnn_biformer_small")
    rpn_cls, rpn_reg = model.apply(variables, x_nhwc, train=False)  # per level (N, H, W, 3), (N, H, W, 12)
    props = proposals(model, variables, x_nhwc)  # Proposals: boxes (N, 1000, 4), scores, count
    cls, reg = roi_heads_on_proposals(model, variables, fpn, props.boxes)  # (N * P, 81), (N * P, 320)
    logits = mask_logits(model, variables, fpn, boxes, labels)  # (N, K, 28, 28) at each box's label
    dets = detect(model, variables, x_nhwc)  # MaskDetections: boxes (N, 100, 4), ..., masks (N, 100, H, W)

`fpn` is the neck's output (`model.apply(..., return_features=True)` returns
`(rpn_cls, rpn_reg, features, fpn)`). Test-time semantics (mmdet 2.11, `rescale=False`):

- proposals: `rpn_head.get_proposals` (top 1000 per level by sorting, decode, NMS 0.7 per level,
  the first 1000);
- boxes (`simple_test_bboxes` in batch mode): each image's proposals are padded at the front to P
  rows (here P is always `rpn_test_cfg.max_per_img`; mmdet pads to the batch's largest count, the
  same when every image has that many), the box head runs on all rows, then every row whose
  proposal has `y2 == 0` gets zero logits and deltas (the padding rows, and real proposals
  clipped to the top edge: their softmax is uniform, 1 / 81 < score_thr). That is 2.11's code
  and what the official numbers were made with; `RCNNTestConfig(zero_y2_rois=False)` switches
  it off (then only padding rows are dropped). Softmax, class-specific decode (stds
  0.1/0.1/0.2/0.2) clipped to the image, `multiclass_nms` (score > 0.05, IoU 0.5, the first 100);
- masks (`simple_test_mask`): the mask head on the detections' boxes, the logits of each
  detection's label, sigmoid, pasted at the input's size (`roi_heads.paste_masks`), `>= 0.5`.
  2.11 also drops detections whose `y2 == 0` at this point; they are kept here (their boxes have
  no pixels in the first row only, a rare case; none occur in the parity data).

Static shapes throughout: padded outputs with counts; RoIs are padded to P per image; the RoI
extractor computes every level for every RoI (`biformer_jax.detection.roi_align`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.detection import AnchorGenerator, DeltaXYWHBBoxCoder, multiclass_nms
from biformer_jax.models.detection import rpn_head as rpn
from biformer_jax.models.detection.fpn import DetFPN
from biformer_jax.models.detection.retinanet import _frozen_batchnorm, _input_sizes
from biformer_jax.models.detection.roi_heads import RoIHead, paste_masks
from biformer_jax.models.layers import Dtype
from biformer_jax.models.segmentation.backbone import BACKBONES


@dataclasses.dataclass(frozen=True)
class RCNNTestConfig:
    """mmdet's `test_cfg.rcnn` of the Mask R-CNN configs, plus the `y2 == 0` switch (see the module)."""

    score_thr: float = 0.05
    iou_threshold: float = 0.5
    max_per_img: int = 100
    mask_thr_binary: float = 0.5
    zero_y2_rois: bool = True


class MaskDetections(NamedTuple):
    """Per image, padded to `max_per_img` rows: boxes (N, K, 4), scores (N, K), labels (N, K) (-1
    past count), count (N,), masks (N, K, H, W) bool, mask_logits (N, K, 28, 28) at the label."""

    boxes: jax.Array
    scores: jax.Array
    labels: jax.Array
    count: jax.Array
    masks: jax.Array
    mask_logits: jax.Array


class MaskRCNN(nn.Module):
    """Backbone family + mmdet FPN + RPNHead + StandardRoIHead (bbox + mask).

    Call: `model.apply(variables, x_nhwc, train=False, return_features=False)` ->
    `(rpn_cls_scores, rpn_bbox_preds)` (lists over the 5 levels, float32 NHWC), plus
    `(features, fpn)` with `return_features=True`. The RoI heads run through `method=`
    (`bbox_forward`, `mask_forward`; see the module's functions).
    """

    backbone: str = "biformer"
    backbone_args: tuple[tuple[str, Any], ...] = ()
    num_classes: int = 80
    neck_channels: int = 256
    num_outs: int = 5
    rpn_feat_channels: int = 256
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_scales: tuple[float, ...] = (8.0,)
    roi_strides: tuple[int, ...] = (4, 8, 16, 32)
    fc_channels: int = 1024
    mask_convs: int = 4
    mask_channels: int = 256
    norm_eval: bool = True
    rpn_test_cfg: rpn.RPNTestConfig = rpn.RPNTestConfig()
    test_cfg: RCNNTestConfig = RCNNTestConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def backbone_config(self) -> dict[str, Any]:
        return dict(self.backbone_args)

    @property
    def n_win(self) -> int:  # for shape inference (convert.dummy_input)
        return self.backbone_config.get("n_win", 7)

    @property
    def in_chans(self) -> int:
        return self.backbone_config.get("in_chans", 3)

    @property
    def anchor_generator(self) -> AnchorGenerator:
        return AnchorGenerator(
            strides=tuple(self.anchor_strides),
            ratios=tuple(self.anchor_ratios),
            scales=tuple(self.anchor_scales),
            octave_base_scale=None,
            scales_per_octave=None,
        )

    @property
    def rpn_coder(self) -> DeltaXYWHBBoxCoder:
        return DeltaXYWHBBoxCoder()

    @property
    def bbox_coder(self) -> DeltaXYWHBBoxCoder:
        return DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2))

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} is not one of {sorted(BACKBONES)}.")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes}: a detector needs at least one class.")
        if len(self.anchor_strides) != self.num_outs:
            raise ValueError(
                f"{len(self.anchor_strides)} anchor strides {tuple(self.anchor_strides)} for "
                f"{self.num_outs} neck outputs: give one stride per level."
            )
        if len(self.roi_strides) > self.num_outs:
            raise ValueError(f"{len(self.roi_strides)} RoI extractor strides for {self.num_outs} neck outputs.")

    def setup(self):
        self.validate()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.backbone_net = BACKBONES[self.backbone](**{**kw, **self.backbone_config}, name="backbone")
        self.neck = DetFPN(self.neck_channels, self.num_outs, 0, add_extra_convs=False, name="neck", **kw)
        num_anchors = len(self.anchor_ratios) * len(self.anchor_scales)
        self.rpn_head = rpn.RPNHead(num_anchors, self.rpn_feat_channels, name="rpn_head", **kw)
        self.roi_head = RoIHead(
            self.num_classes,
            self.fc_channels,
            self.mask_convs,
            self.mask_channels,
            tuple(self.roi_strides),
            name="roi_head",
            **kw,
        )

    def extract_features(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """The backbone's four maps after `extra_norms` (NHWC, strides 4 to 32)."""
        if train and self.norm_eval:
            with nn.intercept_methods(_frozen_batchnorm):
                return self.backbone_net(x, train)
        return self.backbone_net(x, train)

    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        features = self.extract_features(x, train)
        outs = self.neck(features)
        cls_scores, bbox_preds = self.rpn_head(outs)
        if self.is_initializing():  # create the RoI heads' parameters too
            self.roi_head(outs, jnp.zeros((x.shape[0], 1, 4), jnp.float32))
        if return_features:
            return cls_scores, bbox_preds, features, outs
        return cls_scores, bbox_preds

    def bbox_forward(self, fpn, rois: jax.Array):
        """fpn maps, rois (N, P, 4) -> (cls_score (N * P, C + 1), bbox_pred (N * P, C * 4))."""
        return self.roi_head.bbox_forward(fpn, rois)

    def mask_forward(self, fpn, rois: jax.Array) -> jax.Array:
        """fpn maps, rois (N, K, 4) -> (N, K, 28, 28, C) mask logits."""
        return self.roi_head.mask_forward(fpn, rois)


def proposals_from_outputs(model: MaskRCNN, rpn_cls_scores, rpn_bbox_preds, image_sizes: jax.Array) -> rpn.Proposals:
    """The RPN's test post-processing with the model's anchors and `rpn_test_cfg`."""
    return rpn.get_proposals(
        rpn_cls_scores, rpn_bbox_preds, model.anchor_generator, model.rpn_coder, image_sizes, model.rpn_test_cfg
    )


def proposals(model: MaskRCNN, variables, x: jax.Array, image_sizes: Optional[jax.Array] = None) -> rpn.Proposals:
    """Proposals of a batch of NHWC images (jit-able): boxes (N, 1000, 4), scores, count (N,)."""
    sizes = _input_sizes(x, image_sizes)
    cls_scores, bbox_preds = model.apply(variables, x, train=False)
    return proposals_from_outputs(model, cls_scores, bbox_preds, sizes)


def front_pad(props: rpn.Proposals) -> tuple[jax.Array, jax.Array]:
    """mmdet 2.11's batch-mode RoIs: each image's `count` proposals moved to the end of its P rows,
    zero rows in front -> (rois (N, P, 4), valid (N, P))."""
    p = props.boxes.shape[1]
    shift = p - props.count[:, None]  # (N, 1)
    src = jnp.arange(p)[None, :] - shift  # (N, P)
    valid = src >= 0
    rois = jnp.take_along_axis(props.boxes, jnp.maximum(src, 0)[..., None], axis=1)
    return jnp.where(valid[..., None], rois, 0.0), valid


def roi_heads_on_proposals(model: MaskRCNN, variables, fpn, rois: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The box head on (N, P, 4) RoIs: (cls_score (N * P, C + 1), bbox_pred (N * P, C * 4)), before
    any `y2 == 0` zeroing."""
    return model.apply(variables, fpn, rois, method=MaskRCNN.bbox_forward)


def mask_logits(model: MaskRCNN, variables, fpn, boxes: jax.Array, labels: jax.Array) -> jax.Array:
    """The mask head on (N, K, 4) boxes, each box's logits at its label (N, K) -> (N, K, 28, 28)."""
    logits = model.apply(variables, fpn, boxes, method=MaskRCNN.mask_forward)  # (N, K, 28, 28, C)
    idx = jnp.clip(labels, 0, logits.shape[-1] - 1)[..., None, None, None]
    return jnp.take_along_axis(logits, idx, axis=-1)[..., 0]


def bboxes_from_roi_outputs(
    model: MaskRCNN, rois: jax.Array, valid: jax.Array, cls_score, bbox_pred, image_sizes: jax.Array
):
    """`simple_test_bboxes` after the head: rois (N, P, 4), valid (N, P), head outputs (N * P, ...)
    -> `Detections` (batched) with the model's `test_cfg`."""
    cfg = model.test_cfg
    n, p = rois.shape[:2]
    cls_score = cls_score.reshape(n, p, -1)
    bbox_pred = bbox_pred.reshape(n, p, -1)
    if cfg.zero_y2_rois:
        zero = (rois[..., 3] == 0)[..., None]
        cls_score = jnp.where(zero, 0.0, cls_score)
        bbox_pred = jnp.where(zero, 0.0, bbox_pred)

    def one_image(r, v, c, d, size):
        scores = jax.nn.softmax(c, axis=-1)  # (P, C + 1)
        boxes = model.bbox_coder.decode(r, d, max_shape=size)  # (P, C * 4)
        num_classes = scores.shape[-1] - 1
        boxes = boxes.reshape(p, num_classes, 4)
        return multiclass_nms(boxes, scores[:, :num_classes], v, cfg.score_thr, cfg.iou_threshold, cfg.max_per_img)

    return jax.vmap(one_image)(rois, valid, cls_score, bbox_pred, jnp.asarray(image_sizes))


def detections_from_proposals(
    model: MaskRCNN, variables, fpn, props: rpn.Proposals, image_sizes: jax.Array, canvas: tuple[int, int]
) -> MaskDetections:
    """The RoI heads' test path from the FPN maps and the proposals; masks on a canvas (H, W)."""
    rois, valid = front_pad(props)
    cls_score, bbox_pred = roi_heads_on_proposals(model, variables, fpn, rois)
    dets = bboxes_from_roi_outputs(model, rois, valid, cls_score, bbox_pred, image_sizes)
    logits = mask_logits(model, variables, fpn, dets.boxes, dets.labels)  # (N, K, 28, 28)
    present = jnp.arange(dets.boxes.shape[1])[None, :] < dets.count[:, None]
    masks = jax.vmap(
        lambda lg, b, size: paste_masks(
            jax.nn.sigmoid(lg), b, canvas[0], canvas[1], model.test_cfg.mask_thr_binary, image_size=size
        )
    )(logits, dets.boxes, jnp.asarray(image_sizes))
    masks = masks & present[..., None, None]
    logits = jnp.where(present[..., None, None], logits, 0.0)
    return MaskDetections(dets.boxes, dets.scores, dets.labels, dets.count, masks, logits)


def detect(model: MaskRCNN, variables, x: jax.Array, image_sizes: Optional[jax.Array] = None) -> MaskDetections:
    """Detections with masks of a batch of NHWC images (jit-able).

    `image_sizes` (N, 2) int: each image's (height, width) within the (padded) batch (default: the
    batch's size); boxes are clipped to it and masks pasted within it on a canvas of the input's size.
    """
    sizes = _input_sizes(x, image_sizes)
    cls_scores, bbox_preds, _, fpn = model.apply(variables, x, train=False, return_features=True)
    props = proposals_from_outputs(model, cls_scores, bbox_preds, sizes)
    return detections_from_proposals(model, variables, fpn, props, sizes, (x.shape[1], x.shape[2]))
