"""Classification's train and eval steps: top-level pure functions, their dependencies passed as arguments.

The loss is timm's SoftTargetCrossEntropy on Mixup / CutMix targets; the step is built from the
shared pieces in `training.steps` (keys, gradient accumulation, AdamW + EMA + finite guard).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from biformer_jax.training import metrics as metrics_lib
from biformer_jax.training import steps as shared
from biformer_jax.training.train_state import TrainState

# (rng, images, labels) -> (images, soft targets (B, num_classes)); data.mixup_cutmix, bound.
MixFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """timm's SoftTargetCrossEntropy per example: -sum(targets * log_softmax(logits)). (B,)"""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def _loss_and_grads(params, batch_stats, inputs, rngs, *, model) -> tuple[jax.Array, Any, Any]:
    """(mean loss, updated batch_stats, grads) of one (micro-)batch (images, soft targets) in train mode."""
    images, targets = inputs

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"], rngs=rngs
        )
        return soft_target_cross_entropy(logits, targets).mean(), updates["batch_stats"]

    (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, new_batch_stats, grads


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    mix_fn: MixFn,
    ema_decay: float,
    grad_accum_steps: int = 1,
) -> tuple[TrainState, metrics_lib.TrainMetrics]:
    """One optimisation step on a global batch {"image": (B, H, W, C), "label": (B,)}.

    With `grad_accum_steps` = k > 1 the batch is processed as k micro-batches of B / k images in
    a `lax.scan` (activation memory of one micro-batch) and their mean gradient is applied once:
    the same update as the full batch, except that BatchNorm normalises each micro-batch with its
    own statistics and updates its running statistics k times (as PyTorch does with
    accumulation). Mixup/CutMix is drawn once for the whole batch.

    A non-finite loss or gradient leaves the state untouched (step included) and is counted in
    the returned metrics, so the host can stop with the last good state and checkpoint.
    """
    rngs = shared.step_rngs(state)
    images, targets = mix_fn(rngs["mix"], batch["image"], batch["label"])
    model_rngs = {"dropout": rngs["dropout"], "drop_path": rngs["drop_path"]}
    fn = functools.partial(_loss_and_grads, model=model)
    loss, batch_stats, grads = shared.loss_and_grads(state, (images, targets), model_rngs, fn=fn, k=grad_accum_steps)
    return shared.apply_gradients(state, grads, loss, batch_stats, tx=tx, schedule=schedule, ema_decay=ema_decay)


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array], *, model) -> metrics_lib.EvalMetrics:
    """Loss, top-1 and top-5 of one global eval batch {"image", "label", "mask"} (mask 0 = padding)."""
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels = batch["label"]
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]  # (B,)
    # top-k by rank: the label is in the top k when fewer than k logits beat it.
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)  # (B, 1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # (B,)
    return metrics_lib.EvalMetrics.single_from_model_output(
        loss=loss,
        top1=(rank < 1).astype(jnp.float32),
        top5=(rank < 5).astype(jnp.float32),
        mask=batch["mask"] > 0,
    )
