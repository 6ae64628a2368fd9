"""The official optimiser and learning-rate schedule: timm's AdamW and CosineLRScheduler.

Both BiFormer and DeBiFormer train with the DeiT `main.py` recipe on top of timm:

* `lr = config.optim.lr * global_batch / lr_base_batch_size` (the linear scaling rule);
* AdamW (decoupled weight decay, as torch.optim.AdamW: optax.adamw computes the same update),
  weight decay only on parameters with more than one dimension: timm's
  `param_groups_weight_decay` skips 1-D parameters and biases (norm scales and shifts, biases,
  layer-scale gammas), and neither model lists anything else in `no_weight_decay()`;
* optional gradient clipping by global norm before the update (DeBiFormer: 5.0);
* timm's CosineLRScheduler, stepped once per epoch with `t_in_epochs=True` and
  `warmup_prefix=False`: for epoch t < warmup, `warmup_lr + t * (lr - warmup_lr) / warmup`;
  afterwards `min_lr + (lr - min_lr) * (1 + cos(pi * t / epochs)) / 2` (the cosine counts t from
  0, not from the end of warmup); after `epochs`, `min_lr` (timm's cooldown).

Two details of the official loop are kept on purpose (see `lr_schedule`): `main.py` calls
`lr_scheduler.step(epoch)` *after* epoch `epoch`, so epoch e trains at the rate timm computes for
e - 1 (epochs 0 and 1 both at warmup_lr): `epoch_lag=1`; and it discards the epoch count that
`create_scheduler` returns (epochs + cooldown_epochs), so the official runs stop after 300 epochs
and never train the 10 cooldown epochs that train_args.yaml lists: `cooldown_epochs=0`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from biformer_jax.models import block_layout


def scaled_learning_rate(optim_cfg, global_batch_size: int) -> float:
    """The linear scaling rule: lr * global_batch / lr_base_batch_size (5e-4 per 512 images)."""
    return float(optim_cfg.lr) * global_batch_size / float(optim_cfg.lr_base_batch_size)


def lr_schedule(
    optim_cfg, *, base_lr: float, steps_per_epoch: int, num_epochs: int
) -> Callable[[jax.Array], jax.Array]:
    """step -> learning rate, timm's CosineLRScheduler as the official loop steps it.

    With `step_on_epochs` the rate is constant within an epoch (timm `t_in_epochs=True`),
    evaluated at epoch `max(epoch - epoch_lag, 0)`; without it, t = step / steps_per_epoch is a
    fractional epoch (a smooth per-step version of the same curve).
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
    warmup, epochs = float(optim_cfg.warmup_epochs), float(num_epochs)
    warmup_lr, min_lr = float(optim_cfg.warmup_lr), float(optim_cfg.min_lr)
    if optim_cfg.schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: use 'cosine' or 'constant'.")
    step_on_epochs, lag = bool(optim_cfg.step_on_epochs), int(optim_cfg.epoch_lag)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if step_on_epochs:
            t = jnp.maximum(jnp.floor(step / steps_per_epoch) - lag, 0.0)
        else:
            t = step / steps_per_epoch
        if optim_cfg.schedule == "constant":
            main = jnp.full_like(t, base_lr)
        else:
            cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / epochs))
            main = jnp.where(t < epochs, cosine, min_lr)
        if warmup > 0:
            main = jnp.where(t < warmup, warmup_lr + t * (base_lr - warmup_lr) / warmup, main)
        return main

    return schedule


def weight_decay_mask(params):
    """True where weight decay applies: parameters with more than one dimension."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
    optim_cfg, schedule: Callable[[jax.Array], jax.Array], *, mask: Callable[[Any], Any] = weight_decay_mask
) -> optax.GradientTransformation:
    """AdamW with the official hyperparameters, optionally after global-norm clipping.

    `mask`: params -> a tree of bools, True where weight decay applies (default: the official rule),
    decided per block when the params hold stacked stages (`block_layout.per_block_mask`).
    """
    if optim_cfg.name != "adamw":
        raise ValueError(f"optim.name={optim_cfg.name!r}: only 'adamw' (the official optimiser) is implemented.")
    tx = optax.adamw(
        learning_rate=schedule,
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=block_layout.per_block_mask(mask),
    )
    if optim_cfg.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_grad_norm), tx)
    return tx
