"""The training and inference steps the benchmarks time (stand-in for `biformer_jax.steps`).

The semantics are those of the project's train.py (and of the official main.py/engine.py):
soft-target cross entropy on label-smoothed targets (what mixup/cutmix produce), AdamW with
weight decay on kernels only (no decay on biases, norm scales or other 1-D parameters, as
timm's `create_optimizer` filters them), BatchNorm statistics updated in train mode, and an
EMA of parameters and statistics (timm `ModelEma`, decay 0.99996).

Swap point: `make_train_step` is the only function the benchmarks call; once the trainer's
`biformer_jax.steps.train_step` exists, make it return that function bound to its state.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 0.05
EMA_DECAY = 0.99996


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: every leaf of more than one dimension."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(learning_rate: float = 5e-4) -> optax.GradientTransformation:
    return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY, mask=decay_mask)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """mean over the batch of sum(-targets * log_softmax(logits)). logits, targets: (N, classes)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(-targets * logp, axis=-1))


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float = LABEL_SMOOTHING) -> jax.Array:
    """(N,) int -> (N, classes) float32 targets, timm's smoothing (off value smoothing / classes)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, x: jax.Array) -> dict:
    variables = model.init({"params": rng}, x, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(params),
        "ema": {"params": params, "batch_stats": batch_stats},
    }


def train_step(model: nn.Module, tx: optax.GradientTransformation, state: dict, images: jax.Array, labels: jax.Array):
    """One optimizer step. images: (N, H, W, 3), labels: (N,) int. Returns (state, loss)."""
    rng = jax.random.fold_in(jax.random.key(0), state["step"])
    drop_rng, path_rng = jax.random.split(rng)
    targets = smooth_labels(labels, model.num_classes)

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": state["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": drop_rng, "drop_path": path_rng},
        )
        return soft_target_cross_entropy(logits, targets), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "batch_stats": batch_stats}
    ema = jax.tree_util.tree_map(
        lambda e, p: e * EMA_DECAY + (1.0 - EMA_DECAY) * p if jnp.issubdtype(p.dtype, jnp.floating) else p,
        state["ema"],
        new,
    )
    return {"step": state["step"] + 1, **new, "opt_state": opt_state, "ema": ema}, loss


def infer_step(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    """Eval-mode logits (N, classes)."""
    return model.apply(variables, images, train=False)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation):
    """The jitted step(state, images, labels) -> (state, loss), donating the state."""
    return jax.jit(functools.partial(train_step, model, tx), donate_argnums=(0,))


def make_infer_step(model: nn.Module):
    return jax.jit(functools.partial(infer_step, model))
