"""Building blocks shared by BiFormer and DeBiFormer (NHWC throughout).

Parameter names and layouts are chosen so that `biformer_jax.convert` maps them to the
official PyTorch names by rule: a Dense kernel is the transposed `Linear.weight`, a Conv
kernel (kh, kw, in/groups, out) is the permuted `Conv2d.weight` (out, in/groups, kh, kw),
and BatchNorm keeps PyTorch's running statistics and `num_batches_tracked` counter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.ops.recompute import tie

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


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """nn.GELU() as PyTorch defines it: the exact erf form, not the tanh approximation.

    Its VJP keeps only x (autodiff would keep the erfc and the product as well: two more
    hidden-width activations per MLP) and recomputes the derivative in the backward pass.
    """
    return 0.5 * x * jax.lax.erfc(-x * _SQRT_HALF)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    x = tie(g, x)
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * jax.lax.erfc(-x32 * _SQRT_HALF)
    pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x32 * x32)
    return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, eps: float = 1e-6) -> LayerNorm:
    return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class LayerNorm(nn.Module):
    """`nn.LayerNorm` over the last axis (params `scale`, `bias`), statistics in float32.

    Its VJP keeps the normalised input and the per-row 1/std only (autodiff keeps the input,
    the centred input and broadcast statistics as well), and forms the row sums of the
    backward pass as matmuls with `scale`, so no full-size broadcast of it is materialised.
    """

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        dense: Optional[tuple[jax.Array, jax.Array]] = None,
        split_at: Optional[int] = None,
    ):
        """LayerNorm(x), or, given a following Linear's `dense=(kernel, bias)`, that Linear
        applied to it: the fused VJP then keeps the normalised input for both (the Linear's
        input is recomputed from it in the backward pass instead of being held as well).
        `split_at=k` returns the Linear's output as the pair (out[..., :k], out[..., k:]),
        computed as two matmuls, so their gradients never need joining into one array."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        if dense is None:
            return _layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)
        kernel, dense_bias = (a.astype(self.dtype) for a in dense)
        if split_at is None:
            kernels, biases = (kernel,), (dense_bias,)
        else:
            kernels = (kernel[:, :split_at], kernel[:, split_at:])
            biases = (dense_bias[:split_at], dense_bias[split_at:])
        out = _layer_norm_dense(x.astype(self.dtype), scale, bias, kernels, biases, self.epsilon)
        return out[0] if split_at is None else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    xc = x32 - mean
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = xc * rstd
    y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (xhat.astype(x.dtype), rstd, scale)


def _layer_norm_bwd(eps, res, g):
    xhat, rstd, scale = res
    c = xhat.shape[-1]
    axes = tuple(range(xhat.ndim - 1))
    g32, xhat32, scale32 = g.astype(jnp.float32), xhat.astype(jnp.float32), scale.astype(jnp.float32)
    gx = g32 * xhat32
    dscale = jnp.sum(gx, axis=axes)
    dbias = jnp.sum(g32, axis=axes)
    # dxhat = g * scale; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
    m1 = jnp.einsum("...c,c->...", g32, scale32)[..., None] / c  # (..., 1)
    m2 = jnp.einsum("...c,c->...", gx, scale32)[..., None] / c  # (..., 1)
    dx = rstd * (g32 * scale32 - m1 - xhat32 * m2)
    return dx.astype(xhat.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _layer_norm_dense(x, scale, bias, kernels, dense_biases, eps):
    """LayerNorm, then one Linear per (kernel, bias) pair: a tuple of outputs."""
    y = _layer_norm_fwd(x, scale, bias, eps)[0]
    return tuple(jnp.dot(y, k) + b for k, b in zip(kernels, dense_biases))


def _layer_norm_dense_fwd(x, scale, bias, kernels, dense_biases, eps):
    y, (xhat, rstd, _) = _layer_norm_fwd(x, scale, bias, eps)
    out = tuple(jnp.dot(y, k) + b for k, b in zip(kernels, dense_biases))
    return out, (xhat, rstd, scale, bias, kernels)


def _layer_norm_dense_bwd(eps, res, gs):
    xhat, rstd, scale, bias, kernels = res
    xhat = tie(gs[0], xhat)
    y = (xhat.astype(jnp.float32) * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(gs[0].dtype)
    lead = tuple(range(y.ndim - 1))
    dkernels = tuple(jnp.tensordot(y, g, axes=(lead, lead)).astype(k.dtype) for k, g in zip(kernels, gs))  # (C, out)
    dbiases = tuple(jnp.sum(g, axis=lead).astype(k.dtype) for k, g in zip(kernels, gs))
    dy = sum(jnp.dot(g, k.T) for k, g in zip(kernels, gs))  # (..., C)
    dx, dscale, dbias = _layer_norm_bwd(eps, (xhat, rstd, scale), dy)
    return dx, dscale, dbias, dkernels, dbiases


_layer_norm_dense.defvjp(_layer_norm_dense_fwd, _layer_norm_dense_bwd)


def dense_initializers(torch_init_fan_in: Optional[int]) -> tuple[Initializer, Initializer]:
    """(kernel_init, bias_init) of a Linear: timm's trunc_normal(.02) and zero bias (BiFormer's
    `_init_weights`), or, given the input width, PyTorch's own default U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) for both (DeBiFormer never re-initialises)."""
    if torch_init_fan_in is None:
        return dense_init, nn.initializers.zeros
    return conv_init, fan_in_uniform_bias(torch_init_fan_in)


class DenseParams(nn.Module):
    """The `kernel` and `bias` of `dense(features, name)` (same init), for fused ops."""

    features: int
    param_dtype: Dtype = jnp.float32
    torch_init_fan_in: Optional[int] = None

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        return _dense_params(self, in_features, self.features, self.param_dtype, self.torch_init_fan_in)


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
        return _gelu_dense(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


@jax.custom_vjp
def _gelu_dense(x, kernel, bias):
    return jnp.dot(gelu(x), kernel) + bias


def _gelu_dense_fwd(x, kernel, bias):
    return _gelu_dense(x, kernel, bias), (x, kernel)


def _gelu_dense_bwd(res, g):
    x, kernel = res
    x = tie(g, x)
    a = gelu(x)
    lead = tuple(range(g.ndim - 1))
    dkernel = jnp.tensordot(a, g, axes=(lead, lead))  # (in, out)
    dbias = jnp.sum(g, axis=lead)
    da = jnp.dot(g, kernel.T)
    (dx,) = _gelu_bwd(x, da)
    return dx, dkernel.astype(kernel.dtype), dbias.astype(kernel.dtype)


_gelu_dense.defvjp(_gelu_dense_fwd, _gelu_dense_bwd)


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


def resolve_conv_impl(impl: str) -> str:
    """'auto' picks im2col + matmul on CPU (XLA:CPU's convolution and its filter gradient
    are slower than one matmul over the kh*kw*C patch columns), XLA's convolution elsewhere."""
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "conv"
    if impl not in ("conv", "im2col"):
        raise ValueError(f"conv impl={impl!r} is not one of 'auto', 'conv', 'im2col'.")
    return impl


def im2col_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Convolution as one matmul over patch columns. x: (N, H, W, Cin), kernel: (kh, kw, Cin, Cout)."""
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    out_h, out_w = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cols = [
        xp[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]  # kh*kw of (N, H', W', Cin), in the (i, j, cin) order of kernel.reshape
    patches = jnp.concatenate(cols, axis=-1)  # (N, H', W', kh*kw*Cin)
    return jnp.einsum("nhwk,ko->nhwo", patches, kernel.reshape(kh * kw * cin, cout))  # (N, H', W', Cout)


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


def resolve_dwconv_impl(impl: str) -> str:
    """'auto' picks shifted sums on CPU (XLA:CPU's grouped conv is ~70x slower, NOTES.md)."""
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "conv"
    if impl not in ("conv", "shift"):
        raise ValueError(f"dwconv_impl={impl!r} is not one of 'auto', 'conv', 'shift'.")
    return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: int, impl: str = "auto") -> jax.Array:
    """Stride-1 depthwise convolution. x: (N, H, W, C); kernel: (kh, kw, 1, C)."""
    if resolve_dwconv_impl(impl) == "conv":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1, 1),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    return shift_depthwise_conv(x, kernel, padding)


def _shifted_sum(x: jax.Array, kernel: jax.Array, pad_h: int, pad_w: int) -> jax.Array:
    """sum_ij pad(x)[:, i:i+H', j:j+W'] * kernel[i, j]: one fused loop in XLA, no copies.

    Pads (per side) may be negative (a crop), as the input gradient needs when pad > k - 1.
    """
    kh, kw = kernel.shape[:2]
    _, h, w, _ = x.shape
    out_h, out_w = h + 2 * pad_h - kh + 1, w + 2 * pad_w - kw + 1
    zero = jnp.zeros((), x.dtype)
    xp = jax.lax.pad(x, zero, ((0, 0, 0), (pad_h, pad_h, 0), (pad_w, pad_w, 0), (0, 0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i : i + out_h, j : j + out_w, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def shift_depthwise_conv(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Depthwise conv as a sum of shifted slices, with a hand-written VJP.

    Left to autodiff, XLA materialises every shifted slice in the forward pass to reuse it
    for the kernel gradient (kh*kw copies of the input, kept for the backward pass). Here
    the forward keeps only x; the input gradient is the same shifted sum over the output
    gradient with the kernel flipped; the kernel gradient is kh*kw reductions, each fused
    with its slice.
    """
    return _shifted_sum(x, kernel, padding, padding)


def _shift_dwconv_fwd(x, kernel, padding):
    return _shifted_sum(x, kernel, padding, padding), (x, kernel)


def _shift_dwconv_bwd(padding, res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    # x[h] feeds out[h + padding - i]: the transpose correlates g, padded by k - 1 - padding,
    # with the flipped kernel.
    dx = _shifted_sum(g, kernel[::-1, ::-1], kh - 1 - padding, kw - 1 - padding)
    dk = _kernel_grad(tie(g, x), g, kh, kw, padding)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


KERNEL_GRAD_BLOCK = 8  # output columns per matmul block of the depthwise kernel gradient


def _kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int, padding: int) -> jax.Array:
    """dk[i, j, c] = sum_{n,h,w} pad(x)[n, h+i, w+j, c] * g[n, h, w, c] as one batched matmul.

    x: (N, H, W, C), g: (N, H', W', C) -> (kh, kw, 1, C) float32. kh*kw separate reductions
    would each read a materialised shifted copy of x (XLA:CPU fuses no slice into a
    reduction). Instead, per channel and block of B output columns, one matmul over the
    rows (n, h) of x's column window (B + kw - 1 columns) against the block of g shifted
    down by each row tap i (kh*B columns) gives every (input column, row tap, output column)
    product sum of the block; the kw diagonals of each row tap's (B + kw - 1, B) slab are
    the kw column taps. (One matmul with the row taps side by side: kh separate matmuls of
    B columns each, reading g kh times, took 1.5x as long over BiFormer-T's depthwise convs,
    batch 8 at 224, timed alone.)
    """
    n, out_h, out_w, c = g.shape
    bsz = KERNEL_GRAD_BLOCK
    nb = -(-out_w // bsz)
    extra = nb * bsz - out_w  # zero columns that round the output width up to whole blocks
    span = bsz + kw - 1
    hp = out_h + kh - 1  # = H + 2 * padding: the padded rows of x
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding + extra), (0, 0)))  # (N, Hp, nb*B+kw-1, C)
    win = jnp.stack([xp[:, :, b * bsz : b * bsz + span, :] for b in range(nb)])  # (nb, N, Hp, span, C)
    win = win.transpose(4, 0, 3, 1, 2).reshape(c, nb, span, n * hp)  # (C, nb, span, N*Hp)
    gp = jnp.pad(g, ((0, 0), (0, 0), (0, extra), (0, 0))).reshape(n, out_h, nb, bsz, c)  # (N, H', nb, B, C)
    gt = gp.transpose(4, 2, 0, 1, 3)  # (C, nb, N, H', B)
    # Row tap i: g shifted down by i rows within each image's Hp rows.
    gs = [jnp.pad(gt, ((0, 0), (0, 0), (0, 0), (i, kh - 1 - i), (0, 0))) for i in range(kh)]  # (C, nb, N, Hp, B)
    gs = jnp.stack(gs, axis=-2).reshape(c, nb, n * hp, kh * bsz)  # (C, nb, N*Hp, kh*B)
    m = jnp.einsum("cbsr,cbrq->cbsq", win, gs, preferred_element_type=jnp.float32)  # (C, nb, span, kh*B)
    m = m.reshape(c, nb, span, kh, bsz)  # (C, nb, span, kh, B)
    # Column tap j: the products of input column t + j with output column t.
    taps = [jnp.diagonal(m[:, :, j : j + bsz], axis1=2, axis2=4).sum(axis=(1, 3)) for j in range(kw)]  # (C, kh)
    return jnp.stack(taps).transpose(2, 0, 1)[:, :, None, :]  # (kh, kw, 1, C)


shift_depthwise_conv.defvjp(_shift_dwconv_fwd, _shift_dwconv_bwd)


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
    """`nn.BatchNorm2d` with PyTorch semantics on NHWC input.

    Train mode normalises with the biased batch variance over (N, H, W) and, when the
    `batch_stats` collection is mutable, updates the running statistics with momentum
    0.1 and the unbiased variance, and counts `num_batches_tracked`. Under `jax.jit` over a
    mesh the batch mean is a global reduction, so this is synchronised BatchNorm.
    Statistics are always computed in float32.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
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
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                n = math.prod(x.shape[:-1])
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * unbiased
                count.value = count.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        inv = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        y = (x32 - mean) * inv + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath), drawn from the 'drop_path' rng."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("drop_path")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class ConvMlp(nn.Module):
    """The official block MLP: Linear -> (3x3 depthwise conv) -> GELU -> Linear.

    Submodules are named after the official `nn.Sequential` indices (0, 1.dwconv, 3).
    """

    hidden: int
    out: int
    dwconv: bool = False
    dwconv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, norm: Optional[LayerNorm] = None) -> jax.Array:
        """mlp(x), or mlp(norm(x)) with the norm fused into the first Linear (see LayerNorm)."""
        if norm is None:
            x = dense(self.hidden, "0", self.dtype, self.param_dtype)(x)
        else:
            x = norm(x, dense=DenseParams(self.hidden, self.param_dtype, name="0")(x.shape[-1]))
        if self.dwconv:
            x = DWConvWrapper(self.dwconv_impl, self.dtype, self.param_dtype, name="1")(x)
        return GeluDense(self.out, dtype=self.dtype, param_dtype=self.param_dtype, name="3")(x)


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
