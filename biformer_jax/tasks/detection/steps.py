"""The detection train step: a top-level pure function, its dependencies passed as arguments.

The loss is the model family's (family.py): Mask R-CNN's is mmdet 2.11's (`maskrcnn.losses_from_outputs`:
RPN BCE + L1 over 256 sampled anchors per image, RoI softmax CE + L1 over 512 sampled RoIs, mask
BCE of the positives' 28x28 targets), its random sampling drawn from the step's "mix" key folded
with the group index (resumable bit for bit), the masks unpacked from the batch's bit-packed
"gt_masks"; the total is the sum of the five terms. RetinaNet's is mmdet 2.11's RetinaNet loss
(`retinanet.losses_from_outputs`): sigmoid focal loss + L1 on the box deltas, each normalised by
the number of positive anchors. mmdet computes either per GPU (2 images each in the official
8 x 2 runs) and DDP averages the GPUs' gradients; with
`loss_group_size` g > 0 the batch's loss is the mean over groups of g images of each group's
loss, which is that gradient exactly (0: one loss over the whole batch, normalised by all its
positives). The backbone's BatchNorms stay frozen (`norm_eval`: the model applies them with
their running statistics, so `batch_stats` never changes); drop path is active.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from biformer_jax.data.detection import masks as mask_ops
from biformer_jax.models.detection import maskrcnn, retinanet
from biformer_jax.training import metrics as metrics_lib
from biformer_jax.training import steps
from biformer_jax.training.train_state import TrainState

# What the step reads of a batch (the pipeline's other keys stay on the host); Mask R-CNN's adds "gt_masks".
BATCH_KEYS = ("image", "gt_bboxes", "gt_labels", "gt_valid", "pad_shape")
MASK_BATCH_KEYS = (*BATCH_KEYS, "gt_masks")
MASKRCNN_LOSSES = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask")


def batch_keys(with_mask: bool) -> tuple[str, ...]:
    return MASK_BATCH_KEYS if with_mask else BATCH_KEYS


def _groups(n: int, group_size: int) -> list[slice]:
    g = group_size if group_size > 0 and n % group_size == 0 else n
    return [slice(start, start + g) for start in range(0, n, g)]


def detection_loss(model, cls_scores, bbox_preds, gt_bboxes, gt_labels, gt_valid, pad_shape, group_size: int):
    """(total loss, {"loss_cls", "loss_bbox"}) of head outputs, averaged over groups of `group_size` images."""
    parts = []
    for sl in _groups(gt_bboxes.shape[0], group_size):
        out = retinanet.losses_from_outputs(
            model,
            [s[sl] for s in cls_scores],
            [b[sl] for b in bbox_preds],
            gt_bboxes[sl],
            gt_labels[sl],
            gt_valid[sl],
            pad_shape[sl],
        )
        parts.append((out["loss_cls"], out["loss_bbox"]))
    loss_cls = jnp.mean(jnp.stack([p[0] for p in parts]))
    loss_bbox = jnp.mean(jnp.stack([p[1] for p in parts]))
    return loss_cls + loss_bbox, {"loss_cls": loss_cls, "loss_bbox": loss_bbox}


def maskrcnn_loss(model, variables, outputs, inputs, group_size: int, key):
    """(total loss, {the five loss terms}) of Mask R-CNN's train outputs `(rpn_cls, rpn_reg, _, fpn)` on
    `inputs` (BATCH_KEYS order, then packed gt_masks), averaged over groups of `group_size` images."""
    rpn_cls, rpn_reg, _, fpn = outputs
    _, gt_bboxes, gt_labels, gt_valid, pad_shape, packed = inputs
    gt_masks = mask_ops.unpack(packed)  # (N, M, H, W) bool
    parts = []
    for j, sl in enumerate(_groups(gt_bboxes.shape[0], group_size)):
        out = maskrcnn.losses_from_outputs(
            model,
            variables,
            [f[sl] for f in fpn],
            [c[sl] for c in rpn_cls],
            [r[sl] for r in rpn_reg],
            gt_bboxes[sl],
            gt_labels[sl],
            gt_valid[sl],
            gt_masks[sl],
            pad_shape[sl],
            jax.random.fold_in(key, j),
        )
        parts.append([out[k] for k in MASKRCNN_LOSSES])
    terms = {k: jnp.mean(jnp.stack([p[i] for p in parts])) for i, k in enumerate(MASKRCNN_LOSSES)}
    return sum(terms.values()), terms


def _loss_and_grads(params, batch_stats, inputs, rngs, *, model, group_size: int):
    """(loss, batch_stats (unchanged: frozen), grads) of one (micro-)batch in train mode."""
    images, gt_bboxes, gt_labels, gt_valid, pad_shape = inputs[:5]
    model_rngs = {"dropout": rngs["dropout"], "drop_path": rngs["drop_path"]}

    def loss_fn(params):
        variables = {"params": params, "batch_stats": batch_stats}
        if isinstance(model, maskrcnn.MaskRCNN):
            outputs = model.apply(variables, images, train=True, rngs=model_rngs, return_features=True)
            return maskrcnn_loss(model, variables, outputs, inputs, group_size, rngs["sample"])[0]
        cls_scores, bbox_preds = model.apply(variables, images, train=True, rngs=model_rngs)
        loss, _ = detection_loss(model, cls_scores, bbox_preds, gt_bboxes, gt_labels, gt_valid, pad_shape, group_size)
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return loss, batch_stats, grads


def det_train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    ema_decay: float,
    grad_accum_steps: int = 1,
    loss_group_size: int = 2,
) -> tuple[TrainState, metrics_lib.TrainMetrics]:
    """One optimisation step on {"image" (B, H, W, 3), "gt_bboxes" (B, M, 4), "gt_labels" (B, M),
    "gt_valid" (B, M), "pad_shape" (B, 2)} (+ "gt_masks" (B, M, H, W / 8) packed, Mask R-CNN); the
    shared accumulation, AdamW, EMA and finite guard."""
    rngs = steps.step_rngs(state)
    step_rngs = {"dropout": rngs["dropout"], "drop_path": rngs["drop_path"], "sample": rngs["mix"]}
    fn = functools.partial(_loss_and_grads, model=model, group_size=int(loss_group_size))
    inputs = tuple(batch[k] for k in batch_keys(isinstance(model, maskrcnn.MaskRCNN)))
    loss, batch_stats, grads = steps.loss_and_grads(state, inputs, step_rngs, fn=fn, k=grad_accum_steps)
    return steps.apply_gradients(state, grads, loss, batch_stats, tx=tx, schedule=schedule, ema_decay=ema_decay)
