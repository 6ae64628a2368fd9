"""Greedy NMS at fixed size, grouped as mmcv's `batched_nms`, and mmdet 2.11's `multiclass_nms`.

Ported from mmcv 1.7 `ops/nms.py` (`batched_nms`: "per class" by offsetting each box by
`group * (max coordinate + 1)` in float32, then greedy NMS on the offset boxes; torchvision's
kernel: IoU `inter / (area_i + area_j - inter)` without +1, suppress when IoU > threshold) and
mmdet `core/post_processing/bbox_nms.py` (`multiclass_nms`: every (box, class) with score >
score_thr, class-wise NMS, kept boxes by descending score, the first `max_num`).

Static shapes, and what they change:
- candidates come padded with a validity mask; the result is the kept candidates' indices,
  padded with -1, and their count (at most `max_output`);
- greedy NMS runs over the candidates in descending score order in blocks of `block` and stops
  once `max_output` boxes are kept or the valid candidates run out. Within a block the greedy
  result is the fixpoint of "kept = alive and not suppressed by an earlier kept box of the
  block", reached exactly by iterating from all-alive (entry i is final after i rounds). The
  result equals the dynamic greedy algorithm's first `max_output` kept boxes;
- equal scores: the lower candidate index comes first (a stable sort), which is what torch's
  sorts give on the reference's CPU path; mmdet does not define another order;
- the group offset uses the max coordinate over the valid candidates only, as mmcv's over the
  boxes it is given; boxes of different groups never suppress each other even where negative
  coordinates would make offset boxes overlap (mmcv's offset assumes non-negative boxes);
- the IoU threshold (a C++ double in the reference) is compared in float32 as the largest
  float32 not above it, which decides `iou > threshold` exactly as the double comparison does.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _f32_floor(value: float) -> np.float32:
    f = np.float32(value)
    return f if float(f) <= value else np.nextafter(f, np.float32(-np.inf))


def _pair_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """torchvision's NMS overlap of (P, 4) x (Q, 4) -> (P, Q): no eps, so 0 / 0 is NaN (never > thr)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = jnp.maximum(jnp.minimum(a[:, None, 2], b[None, :, 2]) - jnp.maximum(a[:, None, 0], b[None, :, 0]), 0)
    h = jnp.maximum(jnp.minimum(a[:, None, 3], b[None, :, 3]) - jnp.maximum(a[:, None, 1], b[None, :, 1]), 0)
    inter = w * h
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    iou_threshold: float,
    max_output: int,
    groups: Optional[jax.Array] = None,
    block: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS per group on (M, 4) boxes with (M,) scores and (M,) bool `valid`.

    Returns `(keep, count)`: (max_output,) int32 candidate indices by descending score (then
    ascending index), -1 past `count`. `groups` (M,) int (class or level ids), or None for one group.
    Static shapes: at most `max_output` kept, computed in blocks of `block` (see the module).
    """
    m = boxes.shape[0]
    if m == 0 or max_output == 0:
        return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((), jnp.int32)
    boxes = boxes.astype(jnp.float32)
    groups = jnp.zeros((m,), jnp.int32) if groups is None else groups.astype(jnp.int32)
    max_coordinate = jnp.max(jnp.where(valid[:, None], boxes, -jnp.inf))
    offsets = groups.astype(jnp.float32) * (max_coordinate + jnp.float32(1))
    shifted = boxes + offsets[:, None]
    thr = _f32_floor(iou_threshold)

    block = min(block, m)
    n_blocks = -(-m // block)
    pad = n_blocks * block - m
    order = jnp.argsort(jnp.where(valid, -scores.astype(jnp.float32), jnp.inf), stable=True)  # (M,)
    order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).astype(jnp.int32)  # (B * n_blocks,)
    sorted_valid = jnp.concatenate([valid[order[:m]], jnp.zeros((pad,), bool)])
    n_valid = jnp.sum(valid)
    sorted_boxes = shifted[order]  # (B * n_blocks, 4)
    sorted_groups = groups[order]
    earlier = jnp.arange(block)[:, None] < jnp.arange(block)[None, :]  # (B, B): row before column

    def block_step(state):
        b, kept_boxes, kept_groups, keep, count = state
        start = b * block
        cand = jax.lax.dynamic_slice_in_dim(sorted_boxes, start, block)  # (B, 4)
        cand_groups = jax.lax.dynamic_slice_in_dim(sorted_groups, start, block)
        cand_valid = jax.lax.dynamic_slice_in_dim(sorted_valid, start, block)
        cand_index = jax.lax.dynamic_slice_in_dim(order, start, block)
        kept_slot = jnp.arange(max_output) < count
        by_kept = (
            kept_slot[:, None] & (kept_groups[:, None] == cand_groups[None, :]) & (_pair_iou(kept_boxes, cand) > thr)
        )  # (max_output, B)
        alive = cand_valid & ~jnp.any(by_kept, axis=0)
        suppresses = earlier & (cand_groups[:, None] == cand_groups[None, :]) & (_pair_iou(cand, cand) > thr)

        def settle(carry):
            kept, _ = carry
            new = alive & ~jnp.any(kept[:, None] & suppresses, axis=0)
            return new, jnp.any(new != kept)

        kept, _ = jax.lax.while_loop(lambda c: c[1], settle, (alive, jnp.asarray(True)))
        slot = jnp.where(kept, count + jnp.cumsum(kept) - 1, max_output)  # past the end: dropped
        keep = keep.at[slot].set(cand_index, mode="drop")
        kept_boxes = kept_boxes.at[slot].set(cand, mode="drop")
        kept_groups = kept_groups.at[slot].set(cand_groups, mode="drop")
        count = jnp.minimum(count + jnp.sum(kept), max_output)
        return b + 1, kept_boxes, kept_groups, keep, count

    def more(state):
        b, *_, count = state
        return (b < n_blocks) & (b * block < n_valid) & (count < max_output)

    init = (
        jnp.asarray(0),
        jnp.zeros((max_output, 4), jnp.float32),
        jnp.zeros((max_output,), jnp.int32),
        jnp.full((max_output,), -1, jnp.int32),
        jnp.asarray(0, jnp.int32),
    )
    _, _, _, keep, count = jax.lax.while_loop(more, block_step, init)
    return keep, count.astype(jnp.int32)


class Detections(NamedTuple):
    """Padded per-image results: `boxes` (K, 4), `scores` (K,), `labels` (K,) int32 (-1 past
    `count`), `count` () int32; rows past `count` are zeros."""

    boxes: jax.Array
    scores: jax.Array
    labels: jax.Array
    count: jax.Array


def multiclass_nms(
    boxes: jax.Array,
    scores: jax.Array,
    valid: jax.Array,
    score_thr: float,
    iou_threshold: float,
    max_num: int,
    block: int = 256,
) -> Detections:
    """mmdet's `multiclass_nms` on (M, 4) class-agnostic or (M, C, 4) class-specific boxes and
    (M, C) scores (foreground classes only: drop a background column first); `valid` (M,).

    Candidates are the (box, class) pairs, box-major, with score > score_thr (float32 compare).
    Static shapes: all M * C pairs stay, those under the threshold masked; `max_num` rows + count.
    """
    m, c = scores.shape
    if boxes.ndim == 2:
        boxes = jnp.broadcast_to(boxes[:, None, :], (m, c, 4))
    flat_boxes = boxes.reshape(m * c, 4)
    flat_scores = scores.reshape(m * c)
    labels = jnp.tile(jnp.arange(c, dtype=jnp.int32), m)
    cand_valid = jnp.repeat(valid, c) & (flat_scores > jnp.float32(score_thr))
    keep, count = batched_nms(flat_boxes, flat_scores, cand_valid, iou_threshold, max_num, labels, block)
    present = keep >= 0
    idx = jnp.maximum(keep, 0)
    return Detections(
        boxes=jnp.where(present[:, None], flat_boxes[idx], 0.0),
        scores=jnp.where(present, flat_scores[idx], 0.0),
        labels=jnp.where(present, labels[idx], -1),
        count=count,
    )
