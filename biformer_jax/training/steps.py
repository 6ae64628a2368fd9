"""The train and eval steps: top-level pure functions, their dependencies passed as arguments.

`train_lib` binds the keyword arguments with functools.partial and jits them over the mesh, the
state donated. Nothing here reads a config or a global.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from biformer_jax.training import metrics as metrics_lib
from biformer_jax.training.train_state import TrainState, ema_update

# (rng, images, labels) -> (images, soft targets (B, num_classes)); data.mixup_cutmix, bound.
MixFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """timm's SoftTargetCrossEntropy per example: -sum(targets * log_softmax(logits)). (B,)"""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def step_rngs(state: TrainState) -> dict[str, jax.Array]:
    """The step's random keys, a pure function of (base key, step): resumable bit for bit."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mix, dropout, drop_path = jax.random.split(key, 3)
    return {"mix": mix, "dropout": dropout, "drop_path": drop_path}


def _loss_and_grads(params, batch_stats, images, targets, rngs, model) -> tuple[jax.Array, Any, Any]:
    """(mean loss, updated batch_stats, grads) of one (micro-)batch in train mode."""

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"], rngs=rngs
        )
        return soft_target_cross_entropy(logits, targets).mean(), updates["batch_stats"]

    (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, new_batch_stats, grads


def _accumulated_loss_and_grads(state: TrainState, images, targets, rngs, *, model, k: int):
    """loss_and_grads averaged over k micro-batches, summed in a lax.scan (BatchNorm state threaded)."""
    if images.shape[0] % k:
        raise ValueError(f"grad_accum_steps={k} does not divide the batch of {images.shape[0]}.")

    def split(x):
        # Micro-batch j is rows j, j + k, j + 2k, ...: every micro-batch stays spread over all the
        # devices that hold the batch (contiguous blocks of rows), so no data moves.
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)  # (k, B / k, ...)

    def body(carry, xs):
        batch_stats, loss_sum, grad_sum = carry
        j, micro_images, micro_targets = xs
        micro_rngs = {name: jax.random.fold_in(key, j) for name, key in rngs.items()}
        loss, batch_stats, grads = _loss_and_grads(
            state.params, batch_stats, micro_images, micro_targets, micro_rngs, model
        )
        return (batch_stats, loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    init = (state.batch_stats, jnp.zeros((), jnp.float32), zeros)
    (batch_stats, loss_sum, grad_sum), _ = jax.lax.scan(body, init, (jnp.arange(k), split(images), split(targets)))
    grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grad_sum, state.params)
    return loss_sum / k, batch_stats, grads


def apply_gradients(
    state: TrainState,
    grads,
    loss: jax.Array,
    batch_stats,
    *,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    ema_decay: float,
) -> tuple[TrainState, metrics_lib.TrainMetrics]:
    """The update every task's train step ends with: AdamW (tx), the EMA, and the finite guard.

    A non-finite loss or gradient norm leaves the state untouched and is counted in the metrics.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    if state.has_ema:
        new = new.replace(
            ema_params=ema_update(state.ema_params, params, ema_decay),
            ema_batch_stats=ema_update(state.ema_batch_stats, batch_stats, ema_decay),
        )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = metrics_lib.TrainMetrics.single_from_model_output(
        loss=loss,
        grad_norm=grad_norm,
        param_norm=optax.tree.norm(params),
        update_norm=optax.tree.norm(updates),
        learning_rate=schedule(state.step),
        nonfinite=(~finite).astype(jnp.float32),
    )
    return new, metrics


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
    rngs = step_rngs(state)
    images, targets = mix_fn(rngs["mix"], batch["image"], batch["label"])
    model_rngs = {"dropout": rngs["dropout"], "drop_path": rngs["drop_path"]}
    if grad_accum_steps == 1:
        loss, batch_stats, grads = _loss_and_grads(state.params, state.batch_stats, images, targets, model_rngs, model)
    else:
        loss, batch_stats, grads = _accumulated_loss_and_grads(
            state, images, targets, model_rngs, model=model, k=grad_accum_steps
        )
    return apply_gradients(state, grads, loss, batch_stats, tx=tx, schedule=schedule, ema_decay=ema_decay)


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
