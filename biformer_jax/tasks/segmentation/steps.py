"""The segmentation train step: a top-level pure function, its dependencies passed as arguments.

The loss is mmseg's: the decode head's logits (1/4 of the input) bilinearly resized to the label
(align_corners=False), cross entropy with the ignore index, averaged over all label pixels
(ignored ones count as 0: mmseg's CrossEntropyLoss with avg_non_ignore=False, its default; set
`avg_non_ignore` for the mean over labelled pixels only); UperNet adds its auxiliary FCN head's
loss times `aux_weight` (0.4). BatchNorm in train mode normalises over the whole global batch
(the batch is one sharded array under jit): the official SyncBN; a backbone with
`bn_group_size` normalises its own BatchNorms per group of that many images (DeBiFormer's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from biformer_jax.ops.resize import resize_bilinear
from biformer_jax.training import metrics as metrics_lib
from biformer_jax.training import steps
from biformer_jax.training.train_state import TrainState


def seg_cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int, avg_non_ignore: bool) -> jax.Array:
    """Mean cross entropy of (N, h, w, K) logits against (N, H, W) int labels, resized to the labels."""
    logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]  # (N, H, W)
    nll = jnp.where(valid, nll, 0.0)
    denom = jnp.maximum(valid.sum(), 1) if avg_non_ignore else labels.size
    return nll.sum() / denom


def _loss_and_grads(params, batch_stats, inputs, rngs, *, model, loss_cfg):
    """(loss, updated batch_stats, grads) of one (micro-)batch (images, labels) in train mode."""
    images, labels = inputs
    has_aux = bool(getattr(model, "auxiliary_head", False))  # UperNet's FCN head

    def loss_fn(params):
        variables = {"params": params, "batch_stats": batch_stats}
        kw = dict(train=True, mutable=["batch_stats"], rngs=rngs)
        if has_aux:
            (logits, aux), updates = model.apply(variables, images, return_aux=True, **kw)
        else:
            logits, updates = model.apply(variables, images, **kw)
            aux = None
        ce = dict(ignore_index=loss_cfg["ignore_index"], avg_non_ignore=loss_cfg["avg_non_ignore"])
        loss = seg_cross_entropy(logits, labels, **ce)
        if aux is not None and loss_cfg["aux_weight"] > 0:
            loss = loss + loss_cfg["aux_weight"] * seg_cross_entropy(aux, labels, **ce)
        return loss, updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, new_stats, grads


def seg_train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    loss_cfg: dict[str, Any],
    ema_decay: float,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, metrics_lib.TrainMetrics]:
    """One optimisation step on {"image": (B, H, W, 3), "label": (B, H, W) int32, 255 = ignore}.

    `loss_cfg`: {"ignore_index", "avg_non_ignore", "aux_weight"}. With grad_accum_steps k > 1,
    k micro-batches of B / k rows (rows j, j + k, ...) in a lax.scan, their mean gradient applied
    once (BatchNorm then normalises each micro-batch alone). A non-finite loss or gradient
    leaves the state untouched and is counted in the metrics.
    """
    rngs = steps.step_rngs(state)
    model_rngs = {"dropout": rngs["dropout"], "drop_path": rngs["drop_path"]}
    fn = functools.partial(_loss_and_grads, model=model, loss_cfg=loss_cfg)
    inputs = (batch["image"], batch["label"])
    loss, batch_stats, grads = steps.loss_and_grads(state, inputs, model_rngs, fn=fn, k=grad_accum_steps)
    return steps.apply_gradients(state, grads, loss, batch_stats, tx=tx, schedule=schedule, ema_decay=ema_decay)
