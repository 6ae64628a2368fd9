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


def _loss_and_grads(params, batch_stats, images, labels, rngs, *, model, loss_cfg):
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
        decode = seg_cross_entropy(logits, labels, **ce)
        loss = decode
        aux_loss = jnp.zeros((), jnp.float32)
        if aux is not None and loss_cfg["aux_weight"] > 0:
            aux_loss = seg_cross_entropy(aux, labels, **ce)
            loss = loss + loss_cfg["aux_weight"] * aux_loss
        return loss, (updates["batch_stats"], decode, aux_loss)

    (loss, (new_stats, decode, aux_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, new_stats, grads, decode, aux_loss


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
    kw = dict(model=model, loss_cfg=loss_cfg)
    images, labels = batch["image"], batch["label"]
    if grad_accum_steps == 1:
        loss, batch_stats, grads, _, _ = _loss_and_grads(
            state.params, state.batch_stats, images, labels, model_rngs, **kw
        )
    else:
        k = grad_accum_steps

        def split(x):
            return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)  # (k, B / k, ...)

        def body(carry, xs):
            stats, loss_sum, grad_sum = carry
            j, im, lb = xs
            micro_rngs = {name: jax.random.fold_in(key, j) for name, key in model_rngs.items()}
            loss, stats, grads, _, _ = _loss_and_grads(state.params, stats, im, lb, micro_rngs, **kw)
            return (stats, loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (state.batch_stats, jnp.zeros((), jnp.float32), zeros)
        (batch_stats, loss_sum, grad_sum), _ = jax.lax.scan(body, init, (jnp.arange(k), split(images), split(labels)))
        grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grad_sum, state.params)
        loss = loss_sum / k
    return steps.apply_gradients(state, grads, loss, batch_stats, tx=tx, schedule=schedule, ema_decay=ema_decay)
