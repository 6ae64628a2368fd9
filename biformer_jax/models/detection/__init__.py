"""Object detection: RetinaNet and Mask R-CNN (`maskrcnn.py`) on BiFormer / DeBiFormer, as in the
official COCO configs.

    model = models.create_model("retinanet_biformer_small")  # 80 classes
    cls_scores, bbox_preds = model.apply(variables, x_nhwc, train=False)
    dets = retinanet.detect(model, variables, x_nhwc, image_sizes)

`create_model` keyword overrides go to the `RetinaNet` when they name one of its fields
(`num_classes`, `neck_start_level`, `add_extra_convs`, `test_cfg`, `dtype`, ...) and otherwise to
the backbone (`drop_path_rate`, `n_win`, `depth`, ...; `dtype` and `param_dtype` reach both).

DeBiFormer's released RetinaNet configs build mmdet's default FPN (`start_level=0`, no extra
convs: levels at strides 4-64, the fifth by max-pool) under anchors of strides 8-128; the
`retinanet_debiformer_*` models build exactly that. The BiFormer-style neck (`start_level=1`,
`add_extra_convs='on_input'`: P3-P7 at strides 8-128) is one override away:
`create_model("retinanet_debiformer_small", neck_start_level=1, add_extra_convs="on_input")`.
"""

from __future__ import annotations

from typing import Any

from biformer_jax.models.biformer import BIFORMER_VARIANTS
from biformer_jax.models.debiformer import DEBIFORMER_VARIANTS
from biformer_jax.models.detection import anchor_head, maskrcnn, retinanet
from biformer_jax.models.detection.fpn import DetFPN
from biformer_jax.models.detection.maskrcnn import MaskRCNN
from biformer_jax.models.detection.retina_head import RetinaHead
from biformer_jax.models.detection.retinanet import RetinaNet
from biformer_jax.models.segmentation.backbone import build_dense_model


def _biformer(variant: str, drop_path_rate: float) -> dict[str, Any]:
    # BiFormer_mm in the detection configs: n_win 16 with auto_pad (padded regions tie: torch-style
    # tie breaking, as for segmentation); every segmentation-style backbone scans its blocks at inference.
    return dict(
        BIFORMER_VARIANTS[variant],
        n_win=16,
        auto_pad=True,
        routing_ties="torch",
        drop_path_rate=drop_path_rate,
        scan_blocks=True,
    )


def _debiformer(variant: str, n_win: int) -> dict[str, Any]:
    # The release's detection debi_small / debi_base: n_win 16 / 32, auto_pad, topk -2 -> 49 regions,
    # drop path left at the class default 0 (the configs pass none).
    return dict(
        DEBIFORMER_VARIANTS[variant],
        n_win=n_win,
        auto_pad=True,
        all_regions_topk=49,
        drop_path_rate=0.0,
        scan_blocks=True,
    )


_DEBI_NECK = dict(neck_start_level=0, add_extra_convs=False)

DETECTION_VARIANTS: dict[str, dict[str, Any]] = {
    "retinanet_biformer_small": dict(backbone="biformer", backbone_args=_biformer("biformer_small", 0.2)),
    "retinanet_biformer_base": dict(backbone="biformer", backbone_args=_biformer("biformer_base", 0.3)),
    "retinanet_debiformer_small": dict(
        backbone="debiformer", backbone_args=_debiformer("debiformer_small", 16), **_DEBI_NECK
    ),
    "retinanet_debiformer_base": dict(
        backbone="debiformer", backbone_args=_debiformer("debiformer_base", 32), **_DEBI_NECK
    ),
    # Test-only micro variant: every code path in seconds at 64x64 (n_win 2, narrow neck and head).
    "retinanet_biformer_micro": dict(
        backbone="biformer",
        backbone_args=dict(BIFORMER_VARIANTS["biformer_micro"], auto_pad=True),
        neck_channels=16,
        feat_channels=16,
        stacked_convs=1,
        num_classes=5,
    ),
}


# Mask R-CNN (`maskrcnn.py`): the configs' backbones as RetinaNet's (the BiFormer Mask R-CNN configs
# set the same drop path, 0.2 / 0.3; DeBiFormer's mask_rcnn_debi_{small,base}_1x.py pass 0.2 / 0.3
# where its RetinaNet configs pass none), mmdet's default FPN (start_level 0, max-pool P6).
MASKRCNN_VARIANTS: dict[str, dict[str, Any]] = {
    "maskrcnn_biformer_small": dict(backbone="biformer", backbone_args=_biformer("biformer_small", 0.2)),
    "maskrcnn_biformer_base": dict(backbone="biformer", backbone_args=_biformer("biformer_base", 0.3)),
    "maskrcnn_debiformer_small": dict(
        backbone="debiformer", backbone_args=dict(_debiformer("debiformer_small", 16), drop_path_rate=0.2)
    ),
    "maskrcnn_debiformer_base": dict(
        backbone="debiformer", backbone_args=dict(_debiformer("debiformer_base", 32), drop_path_rate=0.3)
    ),
    # Test-only micro variant (and the quickstart's): every code path in seconds at 64x64. Its training
    # samples 128 RoIs per image from 200 proposals (top 500 per level) instead of the configs' 512
    # from 1000 (top 2000): the micro images hold at most a few objects, and the RoI and mask heads
    # over 512 RoIs per image took 3x the step time (0.25 s -> 0.078 s per step of 8 at 96x128).
    "maskrcnn_biformer_micro": dict(
        backbone="biformer",
        backbone_args=dict(BIFORMER_VARIANTS["biformer_micro"], auto_pad=True),
        neck_channels=16,
        rpn_feat_channels=16,
        fc_channels=32,
        mask_convs=1,
        mask_channels=16,
        num_classes=5,
        rpn_test_cfg=maskrcnn.rpn.RPNTestConfig(nms_pre=200, max_per_img=64),
        test_cfg=maskrcnn.RCNNTestConfig(score_thr=0.0, max_per_img=10),
        train_cfg=maskrcnn.TrainConfig(
            rpn_proposal=maskrcnn.rpn.RPNTestConfig(nms_pre=500, iou_threshold=0.7, max_per_img=200),
            rcnn_sampler=maskrcnn.RandomSampler(num=128, pos_fraction=0.25, add_gt_as_proposals=True),
        ),
    ),
}
DETECTION_VARIANTS.update(MASKRCNN_VARIANTS)


def build_detection_model(name: str, **overrides: Any) -> RetinaNet | MaskRCNN:
    """`create_model` for the names of DETECTION_VARIANTS (overrides routed as the module says)."""
    cls = MaskRCNN if name in MASKRCNN_VARIANTS else RetinaNet
    return build_dense_model("detection", name, DETECTION_VARIANTS, cls, overrides)


__all__ = [
    "DETECTION_VARIANTS",
    "MASKRCNN_VARIANTS",
    "DetFPN",
    "MaskRCNN",
    "RetinaHead",
    "RetinaNet",
    "anchor_head",
    "build_detection_model",
    "maskrcnn",
    "retinanet",
]
