"""Semantic segmentation: Semantic FPN and UperNet on BiFormer / DeBiFormer, as in the official
ADE20K configs (rayleizhu/BiFormer `semantic_segmentation/configs/ade20k/`, maclong01/DeBiFormer
`segmentation/configs/`), with mmsegmentation's heads and module names.

    model = models.create_model("upernet_biformer_small", num_classes=150)
    logits, aux = model.apply(variables, x_nhwc, train=False, return_aux=True)

`create_model` keyword overrides go to the `EncoderDecoder` when they name one of its fields
(`num_classes`, `channels`, `dropout_ratio`, `conv_impl`, `dtype`, ...) and otherwise to the
backbone (`drop_path_rate`, `attn_impl`, `use_checkpoint_stages`, `depth`, ...; `dtype` and
`param_dtype` reach both).
"""

from __future__ import annotations

from typing import Any

from biformer_jax.models.biformer import BIFORMER_VARIANTS
from biformer_jax.models.debiformer import DEBIFORMER_VARIANTS
from biformer_jax.models.segmentation.backbone import BiFormerBackbone, DeBiFormerBackbone, build_dense_model
from biformer_jax.models.segmentation.fpn import FPN, FPNHead
from biformer_jax.models.segmentation.heads import FCNHead
from biformer_jax.models.segmentation.pretrained import init_backbone_from_classifier
from biformer_jax.models.segmentation.segmentor import EncoderDecoder
from biformer_jax.models.segmentation.uper import UPerHead


def _biformer(variant: str, drop_path_rate: float) -> dict[str, Any]:
    # BiFormer_mm in the configs: the classifier variant at n_win 8 with auto_pad; padded regions
    # tie, and torch-style tie breaking picks the official region sets.
    return dict(BIFORMER_VARIANTS[variant], n_win=8, auto_pad=True, routing_ties="torch", drop_path_rate=drop_path_rate)


def _debiformer(variant: str, drop_path_rate: float) -> dict[str, Any]:
    # The release's segmentation debi_small / debi_base: n_win 8, auto_pad, topk -2 -> 49 regions.
    return dict(
        DEBIFORMER_VARIANTS[variant], n_win=8, auto_pad=True, all_regions_topk=49, drop_path_rate=drop_path_rate
    )


# How the heads started in the official runs (heads.py): rayleizhu/BiFormer
# semantic_segmentation/train.py builds the segmentor and never calls init_weights() (mmseg 0.30
# does not call it either), so conv_seg kept PyTorch's default init and the FPN convs mmcv
# ConvModule's kaiming init; maclong01/DeBiFormer segmentation/train.py calls
# model.init_weights() (conv_seg normal 0.01, FPN Xavier).
HEAD_INIT = {"biformer": "constructor", "debiformer": "init_weights"}


def _segmentor(backbone: str, args: dict[str, Any], **heads: Any) -> dict[str, Any]:
    # Every segmentation backbone scans its blocks at inference (stages.scanned_blocks): whole-image
    # evaluation at 512 x 2048 compiles one block per stage and peaks at half the memory.
    return dict(backbone=backbone, backbone_args=dict(args, scan_blocks=True), head_init=HEAD_INIT[backbone], **heads)


def _sfpn(backbone: str, args: dict[str, Any]) -> dict[str, Any]:
    return _segmentor(backbone, args, decode_head="fpn")


def _upernet(backbone: str, args: dict[str, Any]) -> dict[str, Any]:
    return _segmentor(backbone, args, decode_head="uper", auxiliary_head=True)


# name -> EncoderDecoder arguments. Drop path rates are the configs' (BiFormer: sfpn S 0.15, B 0.3;
# upernet S 0.3, B 0.4. DeBiFormer: fpn_512_debi_small 0.15; upernet small passes none, so the
# constructor default 0; debi_base hard-codes 0.4 for both).
SEGMENTATION_VARIANTS: dict[str, dict[str, Any]] = {
    "sfpn_biformer_small": _sfpn("biformer", _biformer("biformer_small", 0.15)),
    "sfpn_biformer_base": _sfpn("biformer", _biformer("biformer_base", 0.3)),
    "upernet_biformer_small": _upernet("biformer", _biformer("biformer_small", 0.3)),
    "upernet_biformer_base": _upernet("biformer", _biformer("biformer_base", 0.4)),
    "sfpn_debiformer_small": _sfpn("debiformer", _debiformer("debiformer_small", 0.15)),
    "sfpn_debiformer_base": _sfpn("debiformer", _debiformer("debiformer_base", 0.4)),
    "upernet_debiformer_small": _upernet("debiformer", _debiformer("debiformer_small", 0.0)),
    "upernet_debiformer_base": _upernet("debiformer", _debiformer("debiformer_base", 0.4)),
    # Test-only micro variants: every code path at 64x64 in seconds (n_win 2, narrow heads).
    "sfpn_biformer_micro": dict(
        _sfpn("biformer", dict(BIFORMER_VARIANTS["biformer_micro"], auto_pad=True)),
        channels=16,
        neck_channels=32,
    ),
    "upernet_biformer_micro": dict(
        _upernet("biformer", dict(BIFORMER_VARIANTS["biformer_micro"], auto_pad=True)),
        channels=32,
        aux_channels=16,
    ),
    "sfpn_debiformer_micro": dict(
        _sfpn(
            "debiformer",
            dict(DEBIFORMER_VARIANTS["debiformer_micro"], auto_pad=True, all_regions_topk=3),
        ),
        channels=16,
        neck_channels=32,
    ),
}


def build_segmentation_model(name: str, **overrides: Any) -> EncoderDecoder:
    """`create_model` for the names of SEGMENTATION_VARIANTS (overrides routed as the module says)."""
    return build_dense_model("segmentation", name, SEGMENTATION_VARIANTS, EncoderDecoder, overrides)


__all__ = [
    "BiFormerBackbone",
    "DeBiFormerBackbone",
    "EncoderDecoder",
    "FCNHead",
    "FPN",
    "FPNHead",
    "SEGMENTATION_VARIANTS",
    "UPerHead",
    "build_segmentation_model",
    "init_backbone_from_classifier",
]
