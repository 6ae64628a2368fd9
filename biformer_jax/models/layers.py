"""Building blocks shared by BiFormer and DeBiFormer (NHWC throughout).

Parameter names and layouts are chosen so that `biformer_jax.convert` maps them to the
official PyTorch names by rule: a Dense kernel is the transposed `Linear.weight`, a Conv
kernel (kh, kw, in/groups, out) is the permuted `Conv2d.weight` (out, in/groups, kh, kw),
and BatchNorm keeps PyTorch's running statistics and `num_batches_tracked` counter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.ops import fused
from biformer_jax.ops.conv import im2col_conv, resolve_conv_impl
from biformer_jax.ops.depthwise import depthwise_conv

Dtype = Any
Initializer = Callable[..., jax.Array]

# timm's trunc_normal_(std=.02), the official init for every Linear weight.
dense_init = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def fan_in_uniform_bias(fan_in: int) -> Initializer:
    """PyTorch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, eps: float = 1e-6) -> LayerNorm:
    return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def _norm_params(module: nn.Module, features: int, param_dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """Declares `scale` and `bias` (features,) on `module`, as nn.LayerNorm names them."""
    scale = module.param("scale", nn.initializers.ones, (features,), param_dtype)
    bias = module.param("bias", nn.initializers.zeros, (features,), param_dtype)
    return scale, bias


class LayerNorm(nn.Module):
    """`nn.LayerNorm` over the last axis (params `scale`, `bias`), statistics in float32.

    Its VJP (`ops.fused.layer_norm`) keeps the normalised input and the per-row 1/std only.
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = _norm_params(self, x.shape[-1], self.param_dtype)
        return fused.layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


class LayerNormParams(nn.Module):
    """A LayerNorm's `scale` and `bias` (same names, init and `epsilon`) without applying it:
    a block's pre-norm whose only consumer is a `NormDense`, which applies it fused."""

    epsilon: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
        return _norm_params(self, features, self.param_dtype)


def is_zero_pad(pad) -> bool:
    """Whether `pad` is known at trace time to be all zeros (symbolic pads never are)."""
    return all(isinstance(v, int) and v == 0 for v in pad)


class NormDense(nn.Module):
    """Linear(LayerNorm(x)) as one fused op (`ops.fused.layer_norm_dense`), whose VJP keeps
    the normalised input for both (the Linear's input is recomputed from it in the backward
    pass instead of being held as well).

    The norm's parameters are `norm`'s, a `LayerNormParams` its owner names (a block's
    `norm1`); the Linear's are this module's `kernel` and `bias`, as `dense(features)`
    declares them. Returns a tuple: the Linear's output, or with `split_at=k` the pair
    (out[..., :k], out[..., k:]), computed as two matmuls so their gradients never need
    joining. `pad=(b, r)` zero-pads the outputs of an NHWC map at the bottom/right after the
    norm (BRA's auto_pad): a padded token maps to the bias alone.
    """

    norm: LayerNormParams
    features: int
    split_at: Optional[int] = None
    torch_init_fan_in: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, pad: tuple[int, int] = (0, 0)) -> tuple[jax.Array, ...]:
        scale, bias = self.norm(x.shape[-1])
        kernel, dense_bias = _dense_params(self, x.shape[-1], self.features, self.param_dtype, self.torch_init_fan_in)
        kernel, dense_bias = kernel.astype(self.dtype), dense_bias.astype(self.dtype)
        cuts = (slice(None),) if self.split_at is None else (slice(None, self.split_at), slice(self.split_at, None))
        kernels, biases = tuple(kernel[:, c] for c in cuts), tuple(dense_bias[c] for c in cuts)
        x = x.astype(self.dtype)
        if is_zero_pad(pad):
            return fused.layer_norm_dense(x, scale, bias, kernels, biases, self.norm.epsilon)
        zero_biases = tuple(jnp.zeros_like(b) for b in biases)
        outs = fused.layer_norm_dense(x, scale, bias, kernels, zero_biases, self.norm.epsilon)
        widths = ((0, 0), (0, pad[0]), (0, pad[1]), (0, 0))
        return tuple(jnp.pad(y, widths) + b for y, b in zip(outs, biases))


def dense_initializers(torch_init_fan_in: Optional[int]) -> tuple[Initializer, Initializer]:
    """(kernel_init, bias_init) of a Linear: timm's trunc_normal(.02) and zero bias (BiFormer's
    `_init_weights`), or, given the input width, PyTorch's own default U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) for both (DeBiFormer never re-initialises)."""
    if torch_init_fan_in is None:
        return dense_init, nn.initializers.zeros
    return conv_init, fan_in_uniform_bias(torch_init_fan_in)


def _dense_params(module: nn.Module, in_features: int, features: int, param_dtype: Dtype, torch_init_fan_in=None):
    """Declares `kernel` (in, out) and `bias` (out,) on `module`, as nn.Dense names them."""
    kernel_init, bias_init = dense_initializers(torch_init_fan_in)
    kernel = module.param("kernel", kernel_init, (in_features, features), param_dtype)
    bias = module.param("bias", bias_init, (features,), param_dtype)
    return kernel, bias


class GeluDense(nn.Module):
    """`dense(features)(gelu(x))` (params `kernel`, `bias` as nn.Dense) with a VJP that keeps
    only x: the GELU output, which the matmul's weight gradient needs, is recomputed in the
    backward pass instead of being held (one hidden-width activation per MLP)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = _dense_params(self, x.shape[-1], self.features, self.param_dtype)
        return fused.gelu_dense(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


def dense(
    features: int,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    use_bias: bool = True,
    torch_init_fan_in: Optional[int] = None,
) -> nn.Dense:
    """`nn.Linear` on the last axis, initialised as `dense_initializers(torch_init_fan_in)`."""
    kernel_init, bias_init = dense_initializers(torch_init_fan_in)
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def conv2d(
    features: int,
    kernel_size: int,
    in_features: int,
    name: str,
    dtype: Dtype,
    param_dtype: Dtype,
    stride: int = 1,
    padding: int = 0,
) -> Conv2d:
    """`nn.Conv2d(in, out, k, stride, padding)` on NHWC input, with PyTorch's default init."""
    return Conv2d(
        features,
        kernel_size,
        stride=stride,
        padding=padding,
        bias_init=fan_in_uniform_bias(in_features * kernel_size * kernel_size),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class Conv2d(nn.Module):
    """A dense 2-D convolution on NHWC input; params `kernel` (kh, kw, Cin, Cout) and `bias`
    as `nn.Conv` names them. `impl` chooses XLA's convolution or im2col + matmul."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    bias_init: Initializer = nn.initializers.zeros
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if resolve_conv_impl(self.impl) == "im2col":
            y = im2col_conv(x, kernel, self.stride, self.padding)
        else:
            p = self.padding
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.stride, self.stride), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class DepthwiseConv2d(nn.Module):
    """`nn.Conv2d(dim, dim, k, padding=p, groups=dim)` on NHWC input.

    `impl` chooses between XLA's grouped convolution ('conv') and a sum of shifted slices
    ('shift'); both compute the same function, 'auto' picks by backend.
    """

    kernel_size: int
    padding: Optional[int] = None  # default: kernel_size // 2 ("same")
    use_bias: bool = True
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, k = x.shape[-1], self.kernel_size
        pad = k // 2 if self.padding is None else self.padding
        kernel = self.param("kernel", conv_init, (k, k, 1, c), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = depthwise_conv(x, kernel, pad, self.impl)
        if self.use_bias:
            bias = self.param("bias", fan_in_uniform_bias(k * k), (c,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class BatchNorm(nn.Module):
    """`nn.BatchNorm2d` with PyTorch semantics on NHWC input (N, H, W, C) -> (N, H, W, C).

    Train mode normalises with the biased batch variance over (N, H, W) and, when the
    `batch_stats` collection is mutable, updates the running statistics with momentum
    0.1 and the unbiased variance, and counts `num_batches_tracked`. Under `jax.jit` over a
    mesh the batch mean is a global reduction, so this is synchronised BatchNorm.
    Statistics are always computed in float32.

    `group_size` > 0 is plain `nn.BatchNorm2d` under DDP with `group_size` images per GPU: the
    batch is split into consecutive groups of that many images, each normalised with its own
    statistics (the split is on the global batch, so it does not depend on how many devices
    run it). The running statistics follow the first group alone: DDP broadcasts rank 0's
    buffers before every forward, and mmseg's DDP (broadcast_buffers=False) saves rank 0's,
    so the official checkpoints hold the first GPU's. A batch of at most `group_size` images
    is one group; a larger one must be a multiple of it.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    group_size: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        x32 = x.astype(jnp.float32)
        if train:
            groups = batch_groups(x.shape[0], self.group_size)
            if groups > 1:  # one set of statistics per group, kept broadcastable
                xg = x32.reshape((groups, -1) + x.shape[1:])  # (groups, N / groups, H, W, C)
                axes, keep = tuple(range(1, xg.ndim - 1)), True
            else:
                xg, axes, keep = x32, tuple(range(x.ndim - 1)), False
            mean = jnp.mean(xg, axes, keepdims=keep)  # (groups, 1, 1, 1, C), or (C,) for one group
            var = jnp.mean(jnp.square(xg - mean), axes, keepdims=keep)
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                first_mean, first_var = mean.reshape(-1, c)[0], var.reshape(-1, c)[0]  # the first group's
                n = math.prod(x.shape[:-1]) // groups  # values per channel in one group
                unbiased = first_var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * first_mean
                ra_var.value = (1 - m) * ra_var.value + m * unbiased
                count.value = count.value + 1
        else:
            xg, mean, var = x32, ra_mean.value, ra_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        y = ((xg - mean) * inv + bias.astype(jnp.float32)).reshape(x.shape)
        return y.astype(self.dtype)


def batch_groups(batch: int, group_size: int) -> int:
    """How many BatchNorm groups of `group_size` images a batch of `batch` makes (0: one group)."""
    if group_size < 0:
        raise ValueError(f"bn_group_size={group_size}: use 0 (the whole batch) or a positive group size.")
    if group_size == 0 or batch <= group_size:
        return 1
    if batch % group_size:
        raise ValueError(
            f"A batch of {batch} images does not split into BatchNorm groups of bn_group_size={group_size}: "
            "make the (micro-)batch a multiple of bn_group_size, or set bn_group_size=0 for the whole batch."
        )
    return batch // group_size


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath): x (N, ...) -> x, each sample zeroed with
    probability `rate` and the rest scaled by 1 / (1 - rate).

    The mask is drawn from `key` when given (a block's, see `drop_path_keys`), else from the
    'drop_path' rng. `rate` may be a traced scalar (a scanned stage's per-block rate): the mask
    is then drawn whatever its value, and at rate 0 keeps every sample (x / 1 is x exactly).
    """

    rate: Any

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, key: Optional[jax.Array] = None) -> jax.Array:
        if not train or (isinstance(self.rate, (int, float)) and self.rate == 0.0):
            return x
        # One arithmetic for a Python and a traced rate (float32, float64 under x64), so a
        # scanned stage draws and scales exactly as the unrolled one.
        keep = 1.0 - jnp.asarray(self.rate)
        rng = self.make_rng("drop_path") if key is None else key
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def drop_path_keys(key: Optional[jax.Array], n: int) -> list[Optional[jax.Array]]:
    """The keys of a block's n DropPath calls: fold_in(key, i), or n Nones (each then draws
    from the 'drop_path' rng) when the block got no key."""
    return [None] * n if key is None else [jax.random.fold_in(key, i) for i in range(n)]


class ConvMlp(nn.Module):
    """The official block MLP: Linear -> (3x3 depthwise conv) -> GELU -> Linear.

    Submodules are named after the official `nn.Sequential` indices (0, 1.dwconv, 3). With
    `norm` (a block's pre-norm), computes mlp(norm(x)), the norm fused into the first Linear.
    """

    hidden: int
    out: int
    dwconv: bool = False
    dwconv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm: Optional[LayerNormParams] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        if self.norm is None:
            x = dense(self.hidden, "0", dt, pdt)(x)
        else:
            (x,) = NormDense(self.norm, self.hidden, dtype=dt, param_dtype=pdt, name="0")(x)
        if self.dwconv:
            x = DWConvWrapper(self.dwconv_impl, dt, pdt, name="1")(x)
        return GeluDense(self.out, dtype=dt, param_dtype=pdt, name="3")(x)


class DWConvWrapper(nn.Module):
    """The official `DWConv` (a module holding `dwconv`, 3x3 depthwise)."""

    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return DepthwiseConv2d(3, impl=self.impl, dtype=self.dtype, param_dtype=self.param_dtype, name="dwconv")(x)


def check_nhwc_input(x: jax.Array, in_chans: int, model: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{model} expects a 4-D NHWC batch (N, H, W, {in_chans}), got shape {tuple(x.shape)}.")
    if x.shape[-1] != in_chans:
        hint = " It looks like NCHW: transpose with x.transpose(0, 2, 3, 1)." if x.shape[1] == in_chans else ""
        raise ValueError(
            f"{model} was built with in_chans={in_chans} but the input has {x.shape[-1]} channels "
            f"(shape {tuple(x.shape)}, NHWC expected).{hint} Pass in_chans={x.shape[-1]} to "
            "create_model to build it for this input."
        )


def per_stage(values: Sequence[Any], name: str) -> list:
    values = list(values)
    if len(values) != 4:
        raise ValueError(f"{name} must have one entry per stage (4), got {values!r}.")
    return values
