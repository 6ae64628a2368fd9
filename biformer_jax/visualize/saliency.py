"""Grad-CAM (Selvaraju et al., 2017) and the effective receptive field (Luo et al., 2016).

Both need a stage's output inside the forward pass. `tapped_apply` reads it, and adds a
perturbation to it, by intercepting the call of the stage's last block (`stages_i_j`, the
official module names) with `flax.linen.intercept_methods`: the model's code is untouched, so
its normal forward pass compiles exactly as before.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from biformer_jax.visualize.inputs import block_name


def tapped_apply(model, variables, x: jax.Array, block: str, delta: Optional[jax.Array] = None):
    """(model output, output of the top-level block module `block` (+ delta)) of one forward pass."""
    tapped: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.scope is not None and module.scope.path == (block,):
            out = out if delta is None else out + delta.astype(out.dtype)  # the block, a child of the model
            tapped["out"] = out
        return out

    with nn.intercept_methods(interceptor):
        y = model.apply(variables, x, train=False)
    if "out" not in tapped:
        raise ValueError(f"The model never called a block named {block!r}.")
    return y, tapped["out"]


def stage_output_shape(model, variables, x: jax.Array, stage: int) -> jax.ShapeDtypeStruct:
    name = block_name(variables, stage)
    return jax.eval_shape(lambda x: tapped_apply(model, variables, x, name)[1], x)


def grad_cam(
    model, variables, x: jax.Array, stage: int, class_index: Optional[int] = None
) -> tuple[np.ndarray, int, np.ndarray]:
    """Grad-CAM of one image at a stage's output.

    x: (1, H, W, 3) normalised. Returns (cam (H, W) float32 in [0, 1] at input resolution,
    the class explained (default: the predicted one), logits (num_classes,)). The map is
    ReLU(sum_c alpha_c A_c) with alpha_c the spatial mean of d logit[class] / d A_c, upsampled
    bilinearly; all zeros when no location argues for the class.
    """
    if getattr(model, "features_only", False) or getattr(model, "num_classes", 1) <= 0:
        raise ValueError(
            "Grad-CAM explains a class score, and this model has no classifier (a features_only "
            "backbone or num_classes=0); use the erf command, or a classification checkpoint."
        )
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam takes one image (1, H, W, 3), got {x.shape}.")
    name = block_name(variables, stage)
    shape = stage_output_shape(model, variables, x, stage)

    def score(delta, v, x, cls):  # cls < 0: the predicted class
        y, a = tapped_apply(model, v, x, name, delta)
        cls = jnp.where(cls < 0, jnp.argmax(y[0]), cls)
        return y[0, cls], (a, y[0], cls)

    if class_index is not None and class_index < 0:
        raise ValueError(f"class {class_index} does not exist: classes are numbered from 0.")
    grad_fn = jax.jit(jax.grad(score, has_aux=True))
    wanted = jnp.int32(-1 if class_index is None else class_index)
    grads, (acts, logits, cls) = grad_fn(jnp.zeros(shape.shape, jnp.float32), variables, x, wanted)
    if class_index is not None and class_index >= logits.shape[-1]:
        raise ValueError(f"class {class_index} does not exist: the model has {logits.shape[-1]} classes (0..).")
    cls = int(cls)
    return cam_from(acts[0], grads[0], x.shape[1:3]), cls, np.asarray(logits)


def cam_from(acts: jax.Array, grads: jax.Array, size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM of activations and gradients (h, w, C), upsampled to `size` and scaled to [0, 1]."""
    alpha = jnp.mean(grads.astype(jnp.float32), axis=(0, 1))  # (C,)
    cam = jax.nn.relu(jnp.einsum("hwc,c->hw", acts.astype(jnp.float32), alpha))  # (h, w)
    cam = jax.image.resize(cam, tuple(size), "bilinear")  # (H, W)
    peak = jnp.max(cam)
    return np.asarray(jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0), np.float32)


def erf(model, variables, images: jax.Array, stage: int, batch: int = 8) -> np.ndarray:
    """The effective receptive field of a stage's centre output unit.

    images: (N, H, W, 3) normalised. Returns (H, W) float32: |d sum_c F[h//2, w//2, c] / d x|
    summed over the input's colour channels, averaged over the N images, F the stage output.
    """
    name = block_name(variables, stage)

    def centres(xs, v):  # sum over the batch: images do not interact (eval mode), so the
        _, feat = tapped_apply(model, v, xs, name)  # gradient wrt each image is its own; (B, h, w, C)
        return jnp.sum(feat[:, feat.shape[1] // 2, feat.shape[2] // 2].astype(jnp.float32))

    grads = jax.jit(lambda xs, v: jnp.abs(jax.grad(centres)(xs, v)).sum(-1))  # (B, H, W)
    total = np.zeros(images.shape[1:3], np.float64)
    n, b = images.shape[0], min(batch, images.shape[0])
    for i in range(0, n, b):
        chunk = images[i : i + b]
        k = chunk.shape[0]
        if k < b:  # one compiled shape: pad the last batch, drop the padding's gradients
            chunk = jnp.concatenate([chunk, jnp.zeros((b - k, *chunk.shape[1:]), chunk.dtype)])
        total += np.asarray(grads(chunk, variables), np.float64)[:k].sum(0)
    return (total / images.shape[0]).astype(np.float32)


def mass_fractions(heat: Any, levels=(0.2, 0.5, 0.9)) -> dict[float, float]:
    """{t: the smallest fraction of the pixels that holds a share t of the map's total mass}."""
    values = np.sort(np.asarray(heat, np.float64).ravel())[::-1]
    total = values.sum()
    if total <= 0:
        raise ValueError("The map has no mass (all zeros): the stage output does not depend on the input.")
    cum = np.cumsum(values) / total
    # The first index where the cumulative share reaches t (a tiny slack absorbs rounding).
    return {t: float((np.searchsorted(cum, t - 1e-12) + 1) / values.size) for t in levels}
