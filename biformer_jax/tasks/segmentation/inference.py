"""Segmentation inference as mmseg's EncoderDecoder runs it: whole image, sliding window, aug test.

For one test view (the image resized to the test scale x ratio, maybe flipped):

* whole: logits = model(image) at 1/4 scale, bilinearly resized to the input size;
* slide: windows of crop_size every stride pixels (the last row/column of windows flush with the
  border; windows are the image where it is smaller than the crop), each window's logits resized
  to the window, summed where windows overlap and divided by the number of windows per pixel;

then resized to the label's size (the original image size) and, for a flipped view, flipped
back. With one view the prediction is the argmax of those logits; with several (multi-scale
and/or flip) the softmax outputs of all views are averaged first, as mmseg's aug_test does.
Every resize is bilinear with align_corners=False and no antialiasing (PyTorch's, ops/resize.py).

The network is compiled once per distinct input shape (ahead of time, after which the compiler's
freed memory goes back to the system: biformer_jax.host_memory); the final resize runs with
gather taps passed as arrays and padded to a bucket of 64 pixels, so images of any size share a
handful of compiled programs.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biformer_jax.host_memory import compile_for_inference
from biformer_jax.ops.resize import linear_taps, resize_bilinear

_BUCKET = 64


def _apply_taps(x: jax.Array, taps_y, taps_x) -> jax.Array:
    """Bilinear resize of (N, h, w, C) by per-axis taps (i0, i1, w0, w1) given as arrays."""
    y0, y1, wy0, wy1 = taps_y
    x0, x1, wx0, wx1 = taps_x
    rows = jnp.take(x, y0, axis=1) * wy0[None, :, None, None] + jnp.take(x, y1, axis=1) * wy1[None, :, None, None]
    return jnp.take(rows, x0, axis=2) * wx0[None, None, :, None] + jnp.take(rows, x1, axis=2) * wx1[None, None, :, None]


def slide_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's slide_inference windows (y1, y2, x1, x2): every window has size min(crop, image)."""
    (ch, cw), (sh, sw) = crop, stride
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, height), min(c * sw + cw, width)
            boxes.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return boxes


def _decode(model, variables, images: jax.Array) -> jax.Array:
    """The decode head's logits resized to the input: (N, h, w, 3) -> (N, h, w, K) float32."""
    logits = model.apply(variables, images, train=False).astype(jnp.float32)
    return resize_bilinear(logits, images.shape[1:3])


def view_logits(variables, image: jax.Array, *, model, mode: str, crop, stride, flip: bool) -> jax.Array:
    """Logits of one view at its input size: (1, h, w, 3) -> (1, h, w, K) (flipped views flipped back)."""
    if flip:
        image = image[:, :, ::-1]
    if mode == "whole":
        out = _decode(model, variables, image)
    else:
        h, w = image.shape[1:3]
        boxes = slide_windows(h, w, crop, stride)
        crops = jnp.concatenate([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # (n, ch, cw, 3)
        window_logits = _decode(model, variables, crops)  # (n, ch, cw, K)
        k = window_logits.shape[-1]
        total = jnp.zeros((1, h, w, k), jnp.float32)
        count = np.zeros((1, h, w, 1), np.float32)
        for i, (y1, y2, x1, x2) in enumerate(boxes):
            total = total.at[:, y1:y2, x1:x2].add(window_logits[i : i + 1])
            count[:, y1:y2, x1:x2] += 1
        out = total / jnp.asarray(count)
    return out[:, :, ::-1] if flip else out


def _label_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Taps to resize src -> dst, padded to a multiple of _BUCKET outputs (padding reads index 0)."""
    pad = math.ceil(dst / _BUCKET) * _BUCKET - dst
    return tuple(np.pad(t, (0, pad)) for t in linear_taps(src, dst))


@functools.partial(jax.jit, static_argnames=("softmax",))
def _to_label(logits, taps_y, taps_x, *, softmax: bool):
    """(1, h, w, K) -> (Hb, Wb, K) at the label's (bucket-padded) size; softmax over classes if asked."""
    out = _apply_taps(logits, taps_y, taps_x)[0]
    return jax.nn.softmax(out, axis=-1) if softmax else out


@jax.jit
def _argmax(scores):
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


class Segmenter:
    """Predicts label maps for eval examples (see `seg_pipeline.SegEvalExample`) with one model."""

    def __init__(self, model, variables: Any, eval_cfg):
        self.variables = variables
        self.fn = jax.jit(
            functools.partial(
                view_logits,
                model=model,
                mode=eval_cfg.mode,
                crop=tuple(eval_cfg.crop_size),
                stride=tuple(eval_cfg.stride),
            ),
            static_argnames=("flip",),
        )
        self._compiled: dict[tuple, Any] = {}

    def logits(self, image: np.ndarray, flip: bool) -> jax.Array:
        """(1, h, w, K) logits of one (H, W, 3) view; compiled once per shape and flip."""
        x = jnp.asarray(image)[None]
        key = (x.shape, x.dtype, flip)
        if key not in self._compiled:  # compiled ahead, then the compiler's memory released
            self._compiled[key] = compile_for_inference(self.fn, self.variables, x, flip=flip)
        return self._compiled[key](self.variables, x)

    def scores(self, views, label_hw: tuple[int, int]) -> jax.Array:
        """(Hb, Wb, K) scores at the bucket-padded label size: logits (one view) or summed softmax."""
        height, width = label_hw
        softmax = len(views) > 1
        total = None
        for _, flip, image in views:
            logits = self.logits(image, flip)
            taps_y = _label_taps(logits.shape[1], height)
            taps_x = _label_taps(logits.shape[2], width)
            out = _to_label(logits, taps_y, taps_x, softmax=softmax)
            total = out if total is None else total + out
        return total

    def predict(self, views, label_hw: tuple[int, int]) -> np.ndarray:
        """(H, W) int32 class map of one image."""
        pred = np.asarray(jax.device_get(_argmax(self.scores(views, label_hw))))
        return pred[: label_hw[0], : label_hw[1]]
