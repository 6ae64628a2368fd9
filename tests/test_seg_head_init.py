"""The segmentation heads start as the official runs' did: BiFormer's train.py never calls mmseg's
init_weights() (conv_seg keeps PyTorch's default init, the FPN convs ConvModule's kaiming init),
DeBiFormer's calls it (conv_seg normal 0.01 with zero bias, FPN convs Xavier-uniform)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biformer_jax.models.segmentation import (
    FPN,
    SEGMENTATION_VARIANTS,
    FCNHead,
    FPNHead,
    UPerHead,
    build_segmentation_model,
)

NUM_CLASSES = 150
WIDTHS = (64, 128, 256, 512)  # BiFormer-S's stage widths


def _features(channels=WIDTHS, side=8):
    return [jnp.ones((1, side >> i, side >> i, c)) for i, c in enumerate(channels)]


@pytest.fixture(scope="module", params=["constructor", "init_weights"])
def heads(request):
    """{"fpn": FPN neck params, "fpn_head", "uper", "fcn": head params} at the configs' widths."""
    head_init = request.param
    key = jax.random.key(0)
    feats = _features()
    neck = FPN(256, head_init=head_init)
    neck_params = jax.jit(neck.init)(key, feats)["params"]
    fpn_head = FPNHead(NUM_CLASSES, 128, head_init=head_init)
    uper = UPerHead(NUM_CLASSES, 512, head_init=head_init)
    fcn = FCNHead(NUM_CLASSES, 256, head_init=head_init)
    return head_init, {
        "fpn": neck_params,
        "fpn_head": jax.jit(fpn_head.init)(key, _features((256,) * 4))["params"],
        "uper": jax.jit(uper.init)(key, feats)["params"],
        "fcn": jax.jit(fcn.init)(key, feats)["params"],
    }


def _std(x) -> float:
    return float(np.std(np.asarray(x)))


@pytest.mark.parametrize("head, fan_in", [("fpn_head", 128), ("uper", 512), ("fcn", 256)])
def test_conv_seg_starts_as_the_official_runs(heads, head, fan_in):
    head_init, params = heads
    kernel, bias = params[head]["conv_seg"]["kernel"], params[head]["conv_seg"]["bias"]
    assert kernel.shape == (1, 1, fan_in, NUM_CLASSES)
    bound = 1 / math.sqrt(fan_in)
    if head_init == "constructor":  # nn.Conv2d's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
        assert _std(kernel) == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert float(jnp.max(jnp.abs(kernel))) <= bound
        assert float(jnp.max(jnp.abs(bias))) <= bound and _std(bias) > 0.3 * bound / math.sqrt(3)
    else:  # mmseg's init_cfg: normal(0, 0.01), zero bias
        assert _std(kernel) == pytest.approx(0.01, rel=0.05)
        assert float(jnp.max(jnp.abs(bias))) == 0.0


@pytest.mark.parametrize("conv", ["lateral_convs_0", "lateral_convs_3", "fpn_convs_1"])
def test_fpn_neck_convs_start_as_the_official_runs(heads, conv):
    head_init, params = heads
    kernel = np.asarray(params["fpn"][conv]["conv"]["kernel"])  # (k, k, in, out)
    k, _, cin, cout = kernel.shape
    assert float(np.max(np.abs(params["fpn"][conv]["conv"]["bias"]))) == 0.0
    if head_init == "constructor":  # ConvModule's kaiming_init: normal, fan_out, ReLU gain
        assert _std(kernel) == pytest.approx(math.sqrt(2 / (cout * k * k)), rel=0.05)
    else:  # mmseg FPN's init_cfg: Xavier-uniform
        bound = math.sqrt(6 / (cin * k * k + cout * k * k))
        assert _std(kernel) == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert float(np.max(np.abs(kernel))) <= bound


def test_conv_modules_with_a_norm_are_kaiming_either_way(heads):
    _, params = heads
    kernel = np.asarray(params["uper"]["fpn_bottleneck"]["conv"]["kernel"])  # (3, 3, 4 * 512, 512)
    assert _std(kernel) == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.05)


def test_each_family_uses_what_its_official_train_script_ran():
    for name, spec in SEGMENTATION_VARIANTS.items():
        want = "constructor" if spec["backbone"] == "biformer" else "init_weights"
        assert build_segmentation_model(name).head_init == want, name
    with pytest.raises(ValueError, match="head_init='xavier'"):
        jax.eval_shape(FPN(8, head_init="xavier").init, jax.random.key(0), _features((4, 4, 4, 4)))
