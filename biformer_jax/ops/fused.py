"""Fused elementwise + matmul kernels with hand-written VJPs that keep less for the backward.

`gelu`: PyTorch's exact GELU, keeping only its input. `layer_norm`: LayerNorm over the last
axis, statistics in float32, keeping the normalised input and the per-row 1/std.
`layer_norm_dense`: LayerNorm followed by Linear(s), keeping the normalised input for both.
`gelu_dense`: GELU followed by a Linear, keeping only the GELU's input. The recomputation in
each backward pass is tied to the cotangent (`ops.recompute.tie`) so XLA keeps it there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from biformer_jax.ops.recompute import tie

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps):
    """LayerNorm of x over its last axis with `scale` and `bias`, in x's dtype."""
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


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def layer_norm_dense(x, scale, bias, kernels, dense_biases, eps):
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


layer_norm_dense.defvjp(_layer_norm_dense_fwd, _layer_norm_dense_bwd)


@jax.custom_vjp
def gelu_dense(x, kernel, bias):
    """gelu(x) @ kernel + bias; x: (..., in), kernel: (in, out)."""
    return jnp.dot(gelu(x), kernel) + bias


def _gelu_dense_fwd(x, kernel, bias):
    return gelu_dense(x, kernel, bias), (x, kernel)


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


gelu_dense.defvjp(_gelu_dense_fwd, _gelu_dense_bwd)
