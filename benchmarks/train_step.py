"""The training and inference steps the benchmarks time (stand-in for `biformer_jax.training.steps`).

The semantics are those of the project's train.py (and of the official main.py/engine.py):
soft-target cross entropy on label-smoothed targets (what mixup/cutmix produce), AdamW with
weight decay on kernels only (no decay on biases, norm scales or other 1-D parameters, as
timm's `create_optimizer` filters them), BatchNorm statistics updated in train mode, and an
EMA of parameters and statistics (timm `ModelEma`, decay 0.99996).

Swap point: `build_train` is the only function the benchmarks call. With `which='auto'`
it runs the trainer's own `biformer_jax.training.steps.train_step` (with `biformer_jax.training.train_state`)
when that module is importable (after the trainer branch is merged), else the equivalent
step defined here; `which='trainer'` / `which='bench'` force one. Both use the same AdamW
(weight decay mask: >1-D leaves), label-smoothed soft-target cross entropy and EMA.
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


def _label_smoothing_mix(num_classes: int):
    """The trainer's mix_fn without mixup/cutmix: (rng, images, labels) -> (images, smoothed targets)."""

    def mix(rng, images, labels):
        del rng
        return images, smooth_labels(labels, num_classes)

    return mix


def build_train(model: nn.Module, images: jax.Array, labels: jax.Array, which: str = "auto", learning_rate=5e-4):
    """A compiled-ready training step and its state.

    Returns (name, state, step, args): `step(state, *args)` -> (state, aux), jitted with the
    state donated; name is 'trainer' (biformer_jax.training.steps.train_step) or 'bench' (this file's).
    """
    if which not in ("auto", "trainer", "bench"):
        raise ValueError(f"which={which!r} is not one of 'auto', 'trainer', 'bench'.")
    trainer = None
    if which in ("auto", "trainer"):
        try:
            from biformer_jax.training import steps as trainer  # the trainer's module, once merged
            from biformer_jax.training.train_state import init_train_state
        except ImportError:
            if which == "trainer":
                raise ImportError(
                    "--train_step=trainer needs biformer_jax.steps and biformer_jax.train_state (the trainer "
                    "branch); use --train_step=bench for this file's equivalent step."
                ) from None
    tx = make_optimizer(learning_rate)
    if trainer is None:
        state = jax.jit(lambda k: init_state(model, tx, k, images[:1]))(jax.random.key(0))
        return "bench", state, make_train_step(model, tx), (images, labels)
    state = jax.jit(lambda: init_train_state(0, model=model, tx=tx, input_shape=(1, *images.shape[1:]), use_ema=True))()
    step = functools.partial(
        trainer.train_step,
        model=model,
        tx=tx,
        schedule=lambda step: jnp.asarray(learning_rate, jnp.float32),
        mix_fn=_label_smoothing_mix(model.num_classes),
        ema_decay=EMA_DECAY,
    )
    return "trainer", state, jax.jit(step, donate_argnums=(0,)), ({"image": images, "label": labels},)


def make_infer_step(model: nn.Module):
    return jax.jit(functools.partial(infer_step, model))
