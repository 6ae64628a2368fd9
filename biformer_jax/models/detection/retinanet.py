"""RetinaNet (Lin et al., ICCV 2017) on BiFormer / DeBiFormer, as the official detection configs build it.

The model of rayleizhu/BiFormer `object_detection/configs/coco/retinanet.1x.biformer_{small,base}.py`
(vendored mmdetection 2.11: `RetinaNet` = `BiFormer_mm` backbone + `FPN` + `RetinaHead`) and of
maclong01/DeBiFormer `detection/configs/retinanet_debi_*_1x.py`. Submodules are named as an mmdet
checkpoint names them (`backbone`, `neck`, `bbox_head`), so `biformer_jax.convert` maps its keys by rule.

Entry points (stable; listed in the README):

    model = models.create_model("retinanet_biformer_small")
    # per level (N, H_l, W_l, A*C) logits and (N, H_l, W_l, A*4) deltas
    cls_scores, bbox_preds = model.apply(variables, x_nhwc, train=False)
    dets = detect(model, variables, x_nhwc, image_sizes)  # Detections: boxes (N, 100, 4), ..., count (N,)
    out = loss(model, variables, x_nhwc, gt_bboxes, gt_labels, gt_valid)  # {"loss_cls", "loss_bbox", ...}

`detections_from_outputs` / `losses_from_outputs` do the same from head outputs. The backbone's
BatchNorms stay in eval mode in training (`norm_eval=True`, the configs' `BiFormer_mm`), while
drop path follows `train`.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.detection import AnchorGenerator, DeltaXYWHBBoxCoder, Detections
from biformer_jax.models.detection import anchor_head
from biformer_jax.models.detection.fpn import DetFPN
from biformer_jax.models.detection.retina_head import RetinaHead
from biformer_jax.models.layers import BatchNorm, Dtype
from biformer_jax.models.segmentation.backbone import BACKBONES


def _frozen_batchnorm(next_fun, args, kwargs, context):
    # mmdet's norm_eval: every BatchNorm of the backbone normalises with its running statistics
    # (and leaves them alone) even when the model trains.
    if isinstance(context.module, BatchNorm) and context.method_name == "__call__":
        args, kwargs = args[:1], {}
    return next_fun(*args, **kwargs)


class RetinaNet(nn.Module):
    """Backbone family + mmdet FPN + RetinaHead; anchors, coder and test/train settings as fields.

    `backbone_args`: the backbone's constructor arguments as (name, value) pairs (hashable).
    Call: `model.apply(variables, x_nhwc, train=False, return_features=False)` ->
    `(cls_scores, bbox_preds)` (lists over levels, float32 NHWC), plus `(features, fpn_outs)` with
    `return_features=True`. In train mode pass rngs `drop_path` (and `dropout`).
    """

    backbone: str = "biformer"
    backbone_args: tuple[tuple[str, Any], ...] = ()
    num_classes: int = 80
    neck_channels: int = 256
    neck_start_level: int = 1
    add_extra_convs: Union[bool, str] = "on_input"
    num_outs: int = 5
    feat_channels: int = 256
    stacked_convs: int = 4
    anchor_strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    octave_base_scale: float = 4
    scales_per_octave: int = 3
    norm_eval: bool = True
    test_cfg: anchor_head.TestConfig = anchor_head.TestConfig()
    train_cfg: anchor_head.TrainConfig = anchor_head.TrainConfig()
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
            octave_base_scale=self.octave_base_scale,
            scales_per_octave=self.scales_per_octave,
        )

    @property
    def bbox_coder(self) -> DeltaXYWHBBoxCoder:
        return DeltaXYWHBBoxCoder()

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

    def setup(self):
        self.validate()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.backbone_net = BACKBONES[self.backbone](**{**kw, **self.backbone_config}, name="backbone")
        self.neck = DetFPN(
            self.neck_channels,
            self.num_outs,
            self.neck_start_level,
            add_extra_convs=self.add_extra_convs,
            name="neck",
            **kw,
        )
        num_anchors = len(self.anchor_ratios) * self.scales_per_octave
        self.bbox_head = RetinaHead(
            self.num_classes, num_anchors, self.feat_channels, self.stacked_convs, name="bbox_head", **kw
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
        cls_scores, bbox_preds = self.bbox_head(outs)
        if return_features:
            return cls_scores, bbox_preds, features, outs
        return cls_scores, bbox_preds


def _input_sizes(x: jax.Array, sizes: Optional[jax.Array]) -> jax.Array:
    if sizes is None:
        return jnp.tile(jnp.array([[x.shape[1], x.shape[2]]], jnp.int32), (x.shape[0], 1))
    sizes = jnp.asarray(sizes)
    if sizes.shape != (x.shape[0], 2):
        raise ValueError(f"image sizes must be (N, 2) = (height, width) per image, got shape {sizes.shape}.")
    return sizes


def detections_from_outputs(
    model: RetinaNet, cls_scores, bbox_preds, image_sizes: jax.Array, scale_factors: Optional[jax.Array] = None
) -> Detections:
    """The test post-processing (`anchor_head.get_bboxes`) with the model's anchors, coder and test_cfg."""
    return anchor_head.get_bboxes(
        cls_scores, bbox_preds, model.anchor_generator, model.bbox_coder, image_sizes, scale_factors, model.test_cfg
    )


def losses_from_outputs(
    model: RetinaNet, cls_scores, bbox_preds, gt_bboxes, gt_labels, gt_valid, pad_sizes: jax.Array
) -> dict[str, jax.Array]:
    """The training losses (`anchor_head.losses`) with the model's anchors, coder and train_cfg."""
    return anchor_head.losses(
        cls_scores,
        bbox_preds,
        model.anchor_generator,
        model.bbox_coder,
        gt_bboxes,
        gt_labels,
        gt_valid,
        pad_sizes,
        model.train_cfg,
    )


def detect(
    model: RetinaNet,
    variables,
    x: jax.Array,
    image_sizes: Optional[jax.Array] = None,
    scale_factors: Optional[jax.Array] = None,
) -> Detections:
    """Detections of a batch of NHWC images (jit-able).

    `image_sizes` (N, 2) int: each image's (height, width) within the (padded) batch, boxes are
    clipped to it (default: the batch's size); `scale_factors` (N, 4) or (N,): boxes are divided by
    them (resized input -> original image). Returns `Detections` with a batch axis:
    boxes (N, max_per_img, 4) as (x1, y1, x2, y2), scores, labels (-1 past count), count (N,).
    """
    sizes = _input_sizes(x, image_sizes)  # checked before the forward pass
    cls_scores, bbox_preds = model.apply(variables, x, train=False)
    return detections_from_outputs(model, cls_scores, bbox_preds, sizes, scale_factors)


def loss(
    model: RetinaNet,
    variables,
    x: jax.Array,
    gt_bboxes: jax.Array,
    gt_labels: jax.Array,
    gt_valid: jax.Array,
    pad_sizes: Optional[jax.Array] = None,
    train: bool = False,
    rngs: Optional[dict[str, jax.Array]] = None,
) -> dict[str, jax.Array]:
    """The losses of a batch (jit-able; differentiate `out["loss_cls"] + out["loss_bbox"]`).

    `gt_bboxes` (N, G, 4) in input pixels, `gt_labels` (N, G) int, `gt_valid` (N, G) bool (padding
    False); `pad_sizes` (N, 2) each image's padded size (default: the batch's size). With
    `train=True` drop path is active (pass `rngs={"drop_path": key}`); BatchNorm stays frozen.
    """
    sizes = _input_sizes(x, pad_sizes)
    cls_scores, bbox_preds = model.apply(variables, x, train=train, rngs=rngs)
    return losses_from_outputs(model, cls_scores, bbox_preds, gt_bboxes, gt_labels, gt_valid, sizes)
