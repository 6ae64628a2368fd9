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
extractor computes each RoI at its level on a window of the map at its span, in a loop over the
RoIs (`biformer_jax.detection.roi_align`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from biformer_jax.detection import AnchorGenerator, DeltaXYWHBBoxCoder, MaxIoUAssigner, multiclass_nms
from biformer_jax.detection.losses import bce_with_logits
from biformer_jax.detection.sampler import RandomSampler
from biformer_jax.models.detection import rpn_head as rpn
from biformer_jax.models.detection.fpn import DetFPN
from biformer_jax.models.detection.retinanet import _frozen_batchnorm, _input_sizes
from biformer_jax.models.detection.roi_heads import RoIHead, mask_targets, paste_masks
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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """mmdet's `train_cfg` of the Mask R-CNN configs: RPN assigner 0.7 / 0.3 / 0.3 (low-quality
    matches on), sampler 256 at 50% positives; the training proposals (top 2000 per level, NMS 0.7,
    1000); RoI assigner 0.5 / 0.5 / 0.5, sampler 512 at 25% with the ground truth added; 28x28
    mask targets. Every loss weight is 1."""

    rpn_assigner: MaxIoUAssigner = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
    rpn_sampler: RandomSampler = RandomSampler(num=256, pos_fraction=0.5, add_gt_as_proposals=False)
    rpn_proposal: rpn.RPNTestConfig = rpn.RPNTestConfig(nms_pre=2000, iou_threshold=0.7, max_per_img=1000)
    rcnn_assigner: MaxIoUAssigner = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5)
    rcnn_sampler: RandomSampler = RandomSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True)
    mask_size: int = 28


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
    train_cfg: TrainConfig = TrainConfig()
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


def rpn_losses(model: MaskRCNN, rpn_cls_scores, rpn_bbox_preds, gt_bboxes, gt_valid, pad_sizes, key):
    """mmdet's `RPNHead.loss` (AnchorHead with sampling): every anchor inside its image's padded size
    (`allowed_border=-1`) assigned and sampled; sigmoid BCE over the sampled anchors and L1 over the
    sampled positives, both divided by sum over images of max(positives, 1) + max(negatives, 1)."""
    cfg = model.train_cfg
    gen = model.anchor_generator
    sizes = [(int(m.shape[1]), int(m.shape[2])) for m in rpn_cls_scores]
    anchors = jnp.asarray(np.concatenate(gen.grid_anchors(sizes)))
    n = rpn_cls_scores[0].shape[0]

    def one_image(gb, gv, pad, k):
        valid = jnp.concatenate(gen.valid_flags(sizes, pad))
        res = cfg.rpn_assigner.assign(anchors, gb, gv, None, bboxes_valid=valid)
        pos, neg = cfg.rpn_sampler.sample(k, res.gt_inds, valid)
        matched = gb[jnp.maximum(res.gt_inds - 1, 0)]
        targets = jnp.where(pos[:, None], model.rpn_coder.encode(anchors, matched), 0.0)
        return pos, neg, targets

    keys = jax.random.split(key, n)
    pos, neg, targets = jax.vmap(one_image)(gt_bboxes, gt_valid, pad_sizes, keys)
    avg = (jnp.sum(jnp.maximum(jnp.sum(pos, 1), 1)) + jnp.sum(jnp.maximum(jnp.sum(neg, 1), 1))).astype(jnp.float32)
    logits = jnp.concatenate([m.reshape(n, -1) for m in rpn_cls_scores], axis=1)  # (N, A_total)
    deltas = jnp.concatenate([m.reshape(n, -1, 4) for m in rpn_bbox_preds], axis=1)  # (N, A_total, 4)
    bce = bce_with_logits(logits.astype(jnp.float32), pos.astype(jnp.float32))
    loss_cls = jnp.sum(jnp.where(pos | neg, bce, 0.0)) / avg
    loss_bbox = jnp.sum(jnp.where(pos[..., None], jnp.abs(deltas - targets), 0.0)) / avg
    return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox, "num_rpn_samples": avg}


def _sample_rois(model: MaskRCNN, props: rpn.Proposals, gt_bboxes, gt_labels, gt_valid, key):
    """Per image: the RoI assigner on the proposals, the ground truth put in front (each box assigned
    to itself), the RoI sampler -> rois (N, S, 4), positive / negative slot masks (N, S), labels
    (N, S) (num_classes for negatives), matched ground-truth index (N, S)."""
    cfg = model.train_cfg
    sampler = cfg.rcnn_sampler

    def one_image(boxes, count, gb, gl, gv, k):
        p, g = boxes.shape[0], gb.shape[0]
        pvalid = jnp.arange(p) < count
        res = cfg.rcnn_assigner.assign(boxes, gb, gv, gl, bboxes_valid=pvalid)
        if sampler.add_gt_as_proposals:
            boxes = jnp.concatenate([gb, boxes])
            pvalid = jnp.concatenate([gv, pvalid])
            own = jnp.where(gv, jnp.arange(1, g + 1, dtype=jnp.int32), -1)
            gt_inds = jnp.concatenate([own, res.gt_inds])
            labels = jnp.concatenate([jnp.where(gv, gl.astype(jnp.int32), -1), res.labels])
        else:
            gt_inds, labels = res.gt_inds, res.labels
        pos, neg = sampler.sample(k, gt_inds, pvalid)
        order, spos, sneg = sampler.sampled_order(pos, neg)
        labels = jnp.where(spos, labels[order], model.num_classes)
        return boxes[order], spos, sneg, labels, jnp.maximum(gt_inds[order] - 1, 0)

    keys = jax.random.split(key, props.boxes.shape[0])
    return jax.vmap(one_image)(props.boxes, props.count, gt_bboxes, gt_labels, gt_valid, keys)


def losses_from_outputs(
    model: MaskRCNN,
    variables,
    fpn,
    rpn_cls_scores,
    rpn_bbox_preds,
    gt_bboxes: jax.Array,
    gt_labels: jax.Array,
    gt_valid: jax.Array,
    gt_masks: jax.Array,
    image_sizes: jax.Array,
    key: jax.Array,
) -> dict[str, jax.Array]:
    """mmdet 2.11's Mask R-CNN training losses from the neck's maps and the RPN's outputs.

    `gt_bboxes` (N, G, 4), `gt_labels` (N, G) int, `gt_valid` (N, G) bool, `gt_masks` (N, G, H, W)
    bool / {0, 1} at the input's size; `image_sizes` (N, 2) (img_shape = pad_shape here); `key`
    draws the samples. Returns `loss_rpn_cls`, `loss_rpn_bbox`, `loss_cls` (softmax CE over the
    sampled RoIs / their count), `loss_bbox` (L1 of the positives' class deltas, stds
    0.1/0.1/0.2/0.2, / the sampled count), `loss_mask` (BCE of the positives' 28x28 logits at their
    label, mean), and counts. The proposals carry no gradient (mmdet detaches them).
    """
    cfg = model.train_cfg
    gt_bboxes = jnp.asarray(gt_bboxes, jnp.float32)
    gt_valid = jnp.asarray(gt_valid, bool)
    image_sizes = jnp.asarray(image_sizes)
    key_rpn, key_rcnn = jax.random.split(key)
    out = rpn_losses(model, rpn_cls_scores, rpn_bbox_preds, gt_bboxes, gt_valid, image_sizes, key_rpn)
    props = rpn.get_proposals(
        [jax.lax.stop_gradient(m) for m in rpn_cls_scores],
        [jax.lax.stop_gradient(m) for m in rpn_bbox_preds],
        model.anchor_generator,
        model.rpn_coder,
        image_sizes,
        cfg.rpn_proposal,
    )
    rois, spos, sneg, labels, gt_index = _sample_rois(model, props, gt_bboxes, gt_labels, gt_valid, key_rcnn)
    n, s = labels.shape
    c = model.num_classes
    cls_score, bbox_pred = roi_heads_on_proposals(model, variables, fpn, rois)  # (N * S, C + 1), (N * S, 4C)
    sampled = (spos | sneg).reshape(-1)
    num_sampled = jnp.maximum(jnp.sum(sampled), 1).astype(jnp.float32)
    logp = jax.nn.log_softmax(cls_score, axis=-1)
    ce = -jnp.take_along_axis(logp, labels.reshape(-1, 1), axis=1)[:, 0]
    matched = jnp.take_along_axis(gt_bboxes, gt_index[..., None], axis=1)  # (N, S, 4)
    targets = model.bbox_coder.encode(rois, matched).reshape(-1, 4)
    pred = jnp.take_along_axis(
        bbox_pred.reshape(-1, c, 4), jnp.clip(labels.reshape(-1), 0, c - 1)[:, None, None], axis=1
    )[:, 0]
    pos = spos.reshape(-1)
    out["loss_cls"] = jnp.sum(jnp.where(sampled, ce, 0.0)) / num_sampled
    out["loss_bbox"] = jnp.sum(jnp.where(pos[:, None], jnp.abs(pred - targets), 0.0)) / num_sampled
    # masks: the positives fill the first int(num * pos_fraction) slots
    k = cfg.rcnn_sampler.num_expected_pos
    mrois, mpos, mlabels, mgt = rois[:, :k], spos[:, :k], labels[:, :k], gt_index[:, :k]
    logits = mask_logits(model, variables, fpn, mrois, mlabels)  # (N, K, 28, 28)
    targets = jax.vmap(lambda gm, r, g: mask_targets(gm, r, g, cfg.mask_size))(jnp.asarray(gt_masks), mrois, mgt)
    num_pos = jnp.sum(mpos)
    bce = jnp.where(mpos[..., None, None], bce_with_logits(logits, targets), 0.0)
    out["loss_mask"] = jnp.where(num_pos > 0, jnp.sum(bce) / (jnp.maximum(num_pos, 1) * cfg.mask_size**2), 0.0)
    out["num_rois"] = num_sampled
    out["num_pos_rois"] = jnp.sum(pos).astype(jnp.float32)
    return out


def loss(
    model: MaskRCNN,
    variables,
    x: jax.Array,
    gt_bboxes: jax.Array,
    gt_labels: jax.Array,
    gt_valid: jax.Array,
    gt_masks: jax.Array,
    key: jax.Array,
    image_sizes: Optional[jax.Array] = None,
    train: bool = False,
    rngs: Optional[dict[str, jax.Array]] = None,
) -> dict[str, jax.Array]:
    """The losses of a batch (jit-able; differentiate the sum of the `loss_*` entries). With
    `train=True` drop path is active (pass `rngs={"drop_path": key}`); BatchNorm stays frozen."""
    sizes = _input_sizes(x, image_sizes)
    rpn_cls, rpn_reg, _, fpn = model.apply(variables, x, train=train, rngs=rngs, return_features=True)
    return losses_from_outputs(
        model, variables, fpn, rpn_cls, rpn_reg, gt_bboxes, gt_labels, gt_valid, gt_masks, sizes, key
    )
