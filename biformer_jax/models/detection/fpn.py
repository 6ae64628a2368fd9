"""mmdetection 2.11's `FPN` neck (Lin et al., 2017) with its extra levels, on NHWC maps.

Ported from mmdet `models/necks/fpn.py`. Lateral 1x1 convs on backbone levels
`start_level..end`, a top-down path that adds each level, resized by PyTorch's 'nearest' to the
next lower level's size, 3x3 output convs; then extra levels up to `num_outs`: without
`add_extra_convs`, `max_pool2d(kernel 1, stride 2)` of the last output (mmdet's default, the
DeBiFormer configs' neck); with `'on_input'` (the BiFormer RetinaNet configs) a 3x3 stride-2 conv
on the last backbone level used, then 3x3 stride-2 convs on the previous output (no ReLU unless
`relu_before_extra_convs`); `'on_lateral'` / `'on_output'` start from the last lateral / output.
Convs have a bias and neither norm nor activation, xavier-uniform initialised (mmdet's
`init_weights`). Module names are mmdet's (`lateral_convs_i/conv`, `fpn_convs_i/conv`, the extra
convs continuing the `fpn_convs` numbering), so checkpoints convert by rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models.layers import Dtype, Initializer
from biformer_jax.ops.resize import resize_nearest

EXTRA_CONVS = (False, "on_input", "on_lateral", "on_output")
xavier_uniform = nn.initializers.xavier_uniform()


class Conv2d(nn.Module):
    """`nn.Conv2d(in, features, k, stride, padding=k // 2)` on NHWC: `kernel` (k, k, in, out), `bias`."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    kernel_init: Initializer = xavier_uniform
    bias_init: Initializer = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, pad = self.kernel_size, self.kernel_size // 2
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k == 1 and self.stride == 1:
            y = jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0])  # (N, H, W, features)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                (self.stride, self.stride),
                ((pad, pad), (pad, pad)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        return y + bias.astype(self.dtype)


class ConvModule(nn.Module):
    """mmcv's `ConvModule` without norm: `conv` (with bias), then ReLU when `relu`."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    relu: bool = False
    kernel_init: Initializer = xavier_uniform
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = Conv2d(
            self.features,
            self.kernel_size,
            self.stride,
            self.kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        return nn.relu(y) if self.relu else y


class DetFPN(nn.Module):
    """mmdet's `FPN`. Input: the backbone's maps (finest first); output: `num_outs` NHWC maps.

    RetinaNet on BiFormer: `start_level=1, add_extra_convs='on_input', num_outs=5` -> P3..P7
    (strides 8..128). DeBiFormer's configs: `start_level=0`, no extra convs -> strides 4..64.
    """

    out_channels: int = 256
    num_outs: int = 5
    start_level: int = 0
    end_level: int = -1
    add_extra_convs: Union[bool, str] = False
    relu_before_extra_convs: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        extra = "on_input" if self.add_extra_convs is True else self.add_extra_convs
        if extra not in EXTRA_CONVS:
            raise ValueError(f"add_extra_convs={self.add_extra_convs!r} is not one of {EXTRA_CONVS} (or True).")
        end = len(features) if self.end_level == -1 else self.end_level + 1
        used = end - self.start_level
        if used < 1 or self.num_outs < used:
            raise ValueError(
                f"FPN: start_level={self.start_level}, end_level={self.end_level} use {used} of "
                f"{len(features)} levels, and num_outs={self.num_outs} must be at least that."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inputs = features[self.start_level : end]
        laterals = [ConvModule(self.out_channels, 1, name=f"lateral_convs_{i}", **kw)(f) for i, f in enumerate(inputs)]
        for i in range(used - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_nearest(laterals[i], laterals[i - 1].shape[1:3])
        outs = [ConvModule(self.out_channels, 3, name=f"fpn_convs_{i}", **kw)(x) for i, x in enumerate(laterals)]
        for i in range(used, self.num_outs):
            if not extra:
                outs.append(outs[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2)
                continue
            if i == used:
                source = {"on_input": features[end - 1], "on_lateral": laterals[-1], "on_output": outs[-1]}[extra]
            else:
                source = nn.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
            outs.append(ConvModule(self.out_channels, 3, 2, name=f"fpn_convs_{i}", **kw)(source))
        return outs
