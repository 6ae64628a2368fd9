"""Every model input check raises its own message (issue 16, item 12).

Each case builds a model (or calls the op) with one bad setting and checks the error names the
problem: wrong rank, per-stage lists of the wrong length, representation_size / pe, n_win <= 0,
kv_per_wins / kv_downsample_ratios, param_routing without diff_routing, param_attention, the
conv / dwconv / attention implementation names, and the routed-attention shape checks; and the
checks of DeBiFormer's deformable attention, the routing settings, the segmentation models,
heads, backbones and classifier-weight loading (issue 25, item 11). Models are traced with
`jax.eval_shape` (the checks run while tracing), so nothing is compiled.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biformer_jax import models
from biformer_jax.models import deformable
from biformer_jax.models.routing import RoutingSettings
from biformer_jax.models.segmentation import (
    SEGMENTATION_VARIANTS,
    EncoderDecoder,
    backbone,
    build_segmentation_model,
    fpn,
    heads,
    pretrained,
)
from biformer_jax.ops import conv
from biformer_jax.ops import routed_attention as ra

MICRO = dict(
    depth=(1, 1, 1, 1),
    embed_dim=(16, 32, 64, 64),
    qk_dims=(16, 32, 64, 64),
    head_dim=8,
    num_classes=5,
    kv_downsample_mode="identity",
    n_win=4,
    topks=(2, 2, 2, -2),
)


def _trace(name: str, kwargs: dict, shape=(1, 128, 128, 3)):
    model = models.create_model(name, **kwargs)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_the_micro_settings_themselves_build():
    _trace("biformer", MICRO)
    _trace("debiformer_micro", {}, (1, 64, 64, 3))


BIFORMER_CASES = {
    "rank3": (dict(), (128, 128, 3), "expects a 4-D NHWC batch"),
    "rank5": (dict(), (1, 1, 128, 128, 3), "expects a 4-D NHWC batch"),
    "nchw": (dict(), (1, 3, 128, 128), "It looks like NCHW"),
    "channels": (dict(), (1, 128, 128, 1), "in_chans=3 but the input has 1 channels"),
    "depth_len": (dict(depth=(1, 1, 1)), None, "depth must have one entry per stage (4)"),
    "embed_dim_len": (dict(embed_dim=(16, 32, 64, 64, 64)), None, "embed_dim must have one entry per stage"),
    "topks_len": (dict(topks=(2, 2, -2)), None, "topks must have one entry per stage"),
    "qk_dims_len": (dict(qk_dims=(16, 32)), None, "qk_dims must have one entry per stage"),
    "kv_per_wins_len": (dict(kv_per_wins=(2, 2)), None, "kv_per_wins must have one entry per stage"),
    "ratios_len": (dict(kv_downsample_ratios=(4, 2, 1)), None, "kv_downsample_ratios must have one entry"),
    "kernels_len": (dict(kv_downsample_kernels=(4,)), None, "kv_downsample_kernels must have one entry"),
    "mlp_ratios_len": (dict(mlp_ratios=(4, 4, 4)), None, "mlp_ratios must have one entry per stage"),
    "representation_size": (dict(representation_size=32), None, "representation_size is not supported"),
    "pe": (dict(pe="abs"), None, "pe='abs': the official BiFormer only accepts None"),
    "n_win_zero": (dict(n_win=0), None, "n_win must be positive, got 0"),
    "n_win_negative": (dict(n_win=-2), None, "n_win must be positive, got -2"),
    "kv_per_wins_zero": (
        dict(kv_downsample_mode="ada_avgpool", kv_per_wins=(0, 2, -1, -1)),
        None,
        "kv_downsample_mode='ada_avgpool' needs kv_per_wins > 0 for every routed stage, got 0",
    ),
    "kv_ratio_zero": (
        dict(kv_downsample_mode="avgpool", kv_downsample_ratios=(0, 2, 1, 1)),
        None,
        "kv_downsample_mode='avgpool' needs kv_downsample_ratios >= 1, got 0",
    ),
    "kv_mode": (dict(kv_downsample_mode="conv"), None, "raises NotImplementedError for it too"),
    "param_routing_alone": (dict(param_routing=True), None, "param_routing=True needs diff_routing=True"),
    "diff_without_soft": (dict(diff_routing=True), None, "diff_routing=True without soft_routing"),
    "param_attention": (dict(param_attention="qk"), None, "param_attention='qk' is not one of 'qkvo', 'qkv'"),
    "dwconv_impl": (dict(dwconv_impl="fft"), None, "dwconv_impl='fft' is not one of 'auto', 'conv', 'shift'"),
    "attn_impl": (dict(attn_impl="flash"), None, "routed attention impl='flash' is not one of"),
    "token_mixer": (dict(topks=(2, 2, -3, -2)), None, "topk=-3 is not a valid token mixer"),
    "topk_too_many": (dict(topks=(20, 2, 2, -2)), None, "topk=20 routes to more regions than the 4x4=16"),
    "head_dim": (dict(head_dim=12), None, "not a multiple of head_dim 12"),
    "off_grid": (dict(), (1, 72, 72, 3), "pass auto_pad=True to pad it"),
}


@pytest.mark.parametrize("case", sorted(BIFORMER_CASES))
def test_biformer_input_checks(case):
    kwargs, shape, message = BIFORMER_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        _trace("biformer", {**MICRO, **kwargs}, shape or (1, 128, 128, 3))


DEBIFORMER_CASES = {
    "rank3": (dict(), (64, 64, 3), "expects a 4-D NHWC batch"),
    "nchw": (dict(), (1, 3, 64, 64), "It looks like NCHW"),
    "depth_len": (dict(depth=(1, 1, 1)), None, "depth must have one entry per stage (4)"),
    "topks_len": (dict(topks=(4, 4, -2)), None, "topks must have one entry per stage"),
    "representation_size": (dict(representation_size=32), None, "representation_size is not supported"),
    "pe": (dict(pe="abs"), None, "pe='abs': the release only accepts None"),
    "n_win_zero": (dict(n_win=0), None, "n_win must be positive, got 0"),
    "block_topk": (dict(topks=(4, 4, -1, -2)), None, "topk=-1 is not a DeBiFormer block"),
    "param_attention": (dict(param_attention="qk"), None, "param_attention='qk' is not one of 'qkvo', 'qkv'"),
    "diff_without_soft": (dict(diff_routing=True), None, "diff_routing=True without soft_routing"),
    "qk_dims": (dict(qk_dims=(8, 32, 64, 128)), None, "needs qk_dim == dim"),
    "param_size": (dict(param_size="huge", deform_settings=None), None, "param_size='huge' is not one of"),
    "before_attn_dwconv": (dict(before_attn_dwconv=5), None, "before_attn_dwconv=5"),
    "dwconv_impl": (dict(dwconv_impl="fft"), None, "dwconv_impl='fft' is not one of"),
    "all_regions_topk": (dict(all_regions_topk=5), None, "all_regions_topk=5: the topk -2 blocks route to between 1"),
    "param_size_width": (dict(param_size="small", deform_settings=None), None, "for stage widths [64, 128, 256, 512]"),
    "n_groups": (
        dict(deform_settings=((3, 9, 8, 3, 16), (2, 7, 4, 3, 8), (4, 5, 2, 3, 4), (8, 3, 1, 1, 2))),
        None,
        "into n_groups=3 groups; choose n_groups dividing both",
    ),
    "even_offset_kernel": (
        dict(deform_settings=((1, 8, 8, 3, 16), (2, 7, 4, 3, 8), (4, 5, 2, 3, 4), (8, 3, 1, 1, 2))),
        None,
        "invalid deformable settings DeformSettings(n_groups=1, offset_kernel=8",
    ),
}


@pytest.mark.parametrize("case", sorted(DEBIFORMER_CASES))
def test_debiformer_input_checks(case):
    kwargs, shape, message = DEBIFORMER_CASES[case]
    with pytest.raises(ValueError, match=re.escape(message)):
        _trace("debiformer_micro", kwargs, shape or (1, 64, 64, 3))


def test_conv_impl_name():
    with pytest.raises(ValueError, match=re.escape("conv impl='winograd' is not one of 'auto', 'conv', 'im2col'")):
        conv.resolve_conv_impl("winograd")


def _attention_inputs(n=1, p=4, tq=3, tkv=3, cqk=8, cv=8, k=2):
    q = jnp.zeros((n, p, tq, cqk))
    kv = jnp.zeros((n, p, tkv, cqk + cv))
    r_idx = jnp.zeros((n, p, k), jnp.int32)
    return q, kv, r_idx


ATTENTION_CASES = {
    "q_rank": (lambda q, kv, i: (q[0], kv, i, None, 2), "expects q (N, P, Tq, Cqk) and kv"),
    "regions_differ": (lambda q, kv, i: (q, kv[:, :3], i, None, 2), "over the same (N, P)"),
    "no_value_channels": (lambda q, kv, i: (q, kv[..., :8], i, None, 2), "Cv=0"),
    "heads": (lambda q, kv, i: (q, kv, i, None, 3), "num_heads=3 heads"),
    "r_idx_rank": (lambda q, kv, i: (q, kv, i[0], None, 2), "r_idx must be integer (N, P, K)"),
    "r_idx_float": (lambda q, kv, i: (q, kv, i.astype(jnp.float32), None, 2), "r_idx must be integer"),
    "r_weight_shape": (lambda q, kv, i: (q, kv, i, jnp.ones((1, 4, 3)), 2), "r_weight (1, 4, 3) must have r_idx's"),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
@pytest.mark.parametrize("impl", ["gather", "masked", "chunked"])
def test_routed_attention_shape_checks(case, impl):
    make, message = ATTENTION_CASES[case]
    q, kv, r_idx, r_weight, heads = make(*_attention_inputs())
    with pytest.raises(ValueError, match=re.escape(message)):
        ra.routed_attention(q, kv, r_idx, r_weight, num_heads=heads, scale=1.0, impl=impl)


def test_routed_attention_impl_name():
    q, kv, r_idx = _attention_inputs()
    with pytest.raises(ValueError, match=re.escape("routed attention impl='flash' is not one of")):
        ra.routed_attention(q, kv, r_idx, None, num_heads=2, scale=1.0, impl="flash")


def test_deformable_attention_routes_to_some_regions():
    # DeBiFormer's blocks only build it for topk 4 / 8 / 16; a direct use with topk 0 is refused.
    attn = deformable.DeBiLevelRoutingAttention(
        16, RoutingSettings(num_heads=2, n_win=2, topk=0), settings=(1, 3, 1, 1, 2)
    )
    with pytest.raises(ValueError, match=re.escape("routes to topk > 0 regions, got topk=0")):
        attn.check(attn.resolved_settings())


def test_routing_settings_need_widths_divisible_by_the_heads():
    # The models check head_dim first; RoutingSettings checks what a direct user passes.
    with pytest.raises(ValueError, match=re.escape("qk_dim (16) and dim (12) divisible by num_heads (8)")):
        RoutingSettings(num_heads=8, qk_dim=16).check(12)
    with pytest.raises(ValueError, match=re.escape("qk_dim (16) and dim (16) divisible by num_heads (0)")):
        RoutingSettings(num_heads=0).check(16)


SEGMENTATION_CASES = {
    "backbone": (dict(backbone="swin"), "backbone='swin' is not one of ['biformer', 'debiformer']"),
    "decode_head": (dict(decode_head="aspp"), "decode_head='aspp' is not one of"),
    "num_classes": (dict(num_classes=0), "num_classes=0: a segmentation model needs at least one class"),
}


@pytest.mark.parametrize("case", sorted(SEGMENTATION_CASES))
def test_segmentor_input_checks(case):
    kwargs, message = SEGMENTATION_CASES[case]
    model = EncoderDecoder(**{**SEGMENTATION_VARIANTS["sfpn_biformer_micro"], **kwargs})
    with pytest.raises(ValueError, match=re.escape(message)):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


def test_segmentation_model_names_and_arguments():
    with pytest.raises(ValueError, match=re.escape("Unknown segmentation model 'sfpn_swin'; available: ")):
        build_segmentation_model("sfpn_swin")
    with pytest.raises(TypeError, match=re.escape("sfpn_biformer_micro got unknown argument(s) ['topk']")):
        build_segmentation_model("sfpn_biformer_micro", topk=3)


@pytest.mark.parametrize("cls", [backbone.BiFormerBackbone, backbone.DeBiFormerBackbone])
def test_backbones_have_no_classifier(cls):
    model = cls(features_only=False)
    with pytest.raises(ValueError, match=re.escape(f"{cls.__name__} has no classifier: leave features_only=True")):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))


def _features(strides=(4, 8, 16, 32), side=64):
    return [jax.ShapeDtypeStruct((1, side // s, side // s, 8), jnp.float32) for s in strides]


@pytest.mark.parametrize(
    "strides, message",
    [((4, 8, 16), "feature_strides (4, 8, 16) must give one stride per input level (4 levels)"),
     ((8, 4, 16, 32), "feature_strides (8, 4, 16, 32) must give one stride per input level (4 levels), the finest")],
)  # fmt: skip
def test_fpn_head_needs_one_stride_per_level_finest_first(strides, message):
    head = fpn.FPNHead(num_classes=3, channels=8, feature_strides=strides)
    with pytest.raises(ValueError, match=re.escape(message)):
        jax.eval_shape(lambda f: head.init(jax.random.key(0), f), _features())


def test_fcn_head_needs_a_conv():
    head = heads.FCNHead(num_classes=3, channels=8, num_convs=0)
    with pytest.raises(ValueError, match=re.escape("FCNHead needs num_convs >= 1 (mmseg asserts it), got 0")):
        jax.eval_shape(lambda f: head.init(jax.random.key(0), f), _features())


def test_classifier_weights_must_fit_the_backbone():
    seg = {
        "params": {
            "backbone": {"stem": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}},
            "decode_head": {"b": np.zeros(3, np.float32)},
        }
    }
    other = {
        "params": {
            "stem": {"kernel": np.zeros((3, 3, 3, 16), np.float32)},
            "head": {"kernel": np.zeros((16, 5), np.float32)},
        }
    }
    with pytest.raises(ValueError, match=re.escape("params/backbone/stem/kernel: classifier (3, 3, 3, 16), model (3,")):
        pretrained.init_backbone_from_classifier(seg, other)
    unrelated = {"params": {"encoder": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}}}
    with pytest.raises(ValueError, match=re.escape("The classifier shares no array with this backbone")):
        pretrained.init_backbone_from_classifier(seg, unrelated)
    loaded, names, fresh = pretrained.init_backbone_from_classifier(
        seg, {"params": {"stem": {"kernel": np.ones((3, 3, 3, 8), np.float32)}}}
    )
    assert names == ["params/backbone/stem/kernel"] and fresh == ["params/decode_head/b"]
    assert float(loaded["params"]["backbone"]["stem"]["kernel"].sum()) == 3 * 3 * 3 * 8
