"""mmdetection 2.11's dense-head losses: sigmoid focal loss and L1, weighted, summed, averaged.

Ported from mmdet `models/losses/focal_loss.py` (`py_sigmoid_focal_loss`, the CPU path: the
CUDA kernel computes the same function), `smooth_l1_loss.py` (`L1Loss`) and `utils.py`
(`weight_reduce_loss`: with an `avg_factor`, the weighted sum divided by it).

Static shapes: elementwise with weights, so padded or ignored entries carry weight 0 and add
nothing; unchanged otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bce_with_logits(x: jax.Array, t: jax.Array) -> jax.Array:
    """PyTorch's `binary_cross_entropy_with_logits`, elementwise and stable: (1 - t) x + log(1 +
    exp(-x)) (mmdet's sigmoid `CrossEntropyLoss`: the RPN's classes, the mask head's per-pixel
    targets; the focal loss's cross entropy)."""
    return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, gamma: float = 2.0, alpha: float = 0.25) -> jax.Array:
    """Elementwise focal loss of logits (..., C) against {0, 1} targets (..., C) (one-hot,
    background all zeros): `BCE_with_logits(x, t) * (alpha t + (1 - alpha)(1 - t)) * pt**gamma`,
    `pt = (1 - sigmoid(x)) t + sigmoid(x) (1 - t)`. Static shapes: elementwise, unchanged."""
    x = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    p = jax.nn.sigmoid(x)
    pt = (1 - p) * t + p * (1 - t)
    weight = (alpha * t + (1 - alpha) * (1 - t)) * pt**gamma
    return bce_with_logits(x, t) * weight


def weighted_sum(loss: jax.Array, weight: jax.Array, avg_factor) -> jax.Array:
    """mmdet's `weight_reduce_loss(loss, weight, 'mean', avg_factor)`: sum(loss * weight) / avg_factor.

    Static shapes: padded entries carry weight 0 instead of being removed.
    """
    return jnp.sum(loss * weight) / avg_factor


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Elementwise `|pred - target|`. Static shapes: unchanged."""
    return jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
