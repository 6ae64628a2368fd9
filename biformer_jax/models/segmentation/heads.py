"""mmsegmentation's building blocks on NHWC maps: `ConvModule`, `cls_seg`, `FCNHead`.

Ported from open-mmlab/mmsegmentation (`mmseg/models/decode_heads/decode_head.py`,
`fcn_head.py`) and mmcv's `ConvModule`. Module names are mmseg's (`conv`, `bn`, `conv_seg`,
`convs_0`), so `biformer_jax.convert` maps an mmseg checkpoint's keys by rule.

- `ConvModule`: conv (bias only without a norm, mmcv's bias="auto") -> BatchNorm -> ReLU.
  BatchNorm is PyTorch's (eps 1e-5, momentum 0.1): running statistics in eval; in train the
  batch statistics, which under `jax.jit` over a mesh are those of the global batch, i.e.
  the configs' SyncBN.
- `cls_seg`: channel dropout (`nn.Dropout2d`: whole feature maps, per sample, ratio 0.1 in
  the configs) then the 1x1 `conv_seg`.

Initialisation follows what the official runs ran (`head_init`): ConvModule convs are
kaiming-normal (fan_out, ReLU gain) with zero bias and norms 1/0 either way (mmcv's ConvModule
initialises itself in its constructor). With 'init_weights' (mmseg's `init_weights()`, which
DeBiFormer's segmentation/train.py calls) `conv_seg` is normal(0, 0.01) with zero bias and the
FPN neck's convs Xavier-uniform; with 'constructor' (BiFormer's semantic_segmentation/train.py
never calls it, and mmseg 0.30's constructors do not) `conv_seg` keeps PyTorch's default Conv2d
init, U(+-1/sqrt(fan_in)) for weight and bias, and the neck keeps ConvModule's kaiming init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models.layers import (
    BatchNorm,
    Dtype,
    Initializer,
    conv_init,
    fan_in_uniform_bias,
    im2col_conv,
    resolve_conv_impl,
)

kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
xavier_uniform = nn.initializers.xavier_uniform()
conv_seg_init = nn.initializers.normal(0.01)
HEAD_INITS = ("init_weights", "constructor")  # see the module docstring


def check_head_init(head_init: str) -> None:
    if head_init not in HEAD_INITS:
        raise ValueError(
            f"head_init={head_init!r}: use 'init_weights' (mmseg's init_weights() was called, as in "
            "DeBiFormer's train.py) or 'constructor' (it was not, as in BiFormer's)."
        )


class Conv(nn.Module):
    """`nn.Conv2d(in, features, k, padding=k // 2)` on NHWC; params `kernel` (kh, kw, in, out), `bias`.

    The bias starts at zero, or with `torch_bias_init` at PyTorch's default U(+-1/sqrt(fan_in))."""

    features: int
    kernel_size: int
    use_bias: bool = True
    kernel_init: Initializer = kaiming_fan_out
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    torch_bias_init: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, pad = self.kernel_size, self.kernel_size // 2
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k == 1:
            y = jnp.einsum("nhwc,co->nhwo", x, kernel[0, 0])  # (N, H, W, features)
        elif resolve_conv_impl(self.impl) == "im2col":
            y = im2col_conv(x, kernel, 1, pad)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if self.use_bias:
            bias_init = fan_in_uniform_bias(k * k * x.shape[-1]) if self.torch_bias_init else nn.initializers.zeros
            y = y + self.param("bias", bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class ConvModule(nn.Module):
    """mmcv's `ConvModule`: `conv` -> `bn` (BatchNorm) -> ReLU, or a bare conv with bias.

    `norm=False` gives the FPN neck's convs (bias, no norm, no activation).
    """

    features: int
    kernel_size: int
    norm: bool = True
    kernel_init: Initializer = kaiming_fan_out
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        use_bias = not self.norm  # mmcv's bias="auto"
        y = Conv(self.features, self.kernel_size, use_bias, self.kernel_init, self.conv_impl, dt, pdt, name="conv")(x)
        if not self.norm:
            return y
        y = BatchNorm(dtype=dt, param_dtype=pdt, name="bn")(y, train)
        return nn.relu(y)


def cls_seg(
    x: jax.Array,
    num_classes: int,
    dropout_ratio: float,
    train: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    head_init: str = "init_weights",
) -> jax.Array:
    """mmseg's `BaseDecodeHead.cls_seg`, called inside a head's compact method (makes `conv_seg`).

    Dropout2d zeroes whole channels per sample: the mask broadcasts over H and W. `head_init`
    picks `conv_seg`'s initial values (module docstring).
    """
    check_head_init(head_init)
    if dropout_ratio > 0:
        x = nn.Dropout(dropout_ratio, broadcast_dims=(1, 2), deterministic=not train)(x)
    torch_default = head_init == "constructor"
    kernel_init = conv_init if torch_default else conv_seg_init
    conv = Conv(
        num_classes,
        1,
        True,
        kernel_init,
        dtype=dtype,
        param_dtype=param_dtype,
        torch_bias_init=torch_default,
        name="conv_seg",
    )
    return conv(x).astype(jnp.float32)


class FCNHead(nn.Module):
    """mmseg's `FCNHead` (the UperNet configs' auxiliary head: one 3x3 conv, no concat).

    Input: the backbone's maps; uses `features[in_index]`. Output: (N, h, w, num_classes)
    float32 logits at that map's resolution.
    """

    num_classes: int = 150
    channels: int = 256
    in_index: int = 2
    num_convs: int = 1
    kernel_size: int = 3
    concat_input: bool = False
    dropout_ratio: float = 0.1
    conv_impl: str = "auto"
    head_init: str = "init_weights"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: list[jax.Array], train: bool = False) -> jax.Array:
        if self.num_convs < 1:
            raise ValueError(f"FCNHead needs num_convs >= 1 (mmseg asserts it), got {self.num_convs}.")
        kw = dict(conv_impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
        x = features[self.in_index]
        y = x
        for i in range(self.num_convs):
            y = ConvModule(self.channels, self.kernel_size, name=f"convs_{i}", **kw)(y, train)
        if self.concat_input:
            y = ConvModule(self.channels, self.kernel_size, name="conv_cat", **kw)(
                jnp.concatenate([x.astype(y.dtype), y], axis=-1), train
            )
        return cls_seg(y, self.num_classes, self.dropout_ratio, train, self.dtype, self.param_dtype, self.head_init)
