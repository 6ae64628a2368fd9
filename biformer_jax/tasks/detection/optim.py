"""The official detection optimiser and schedule: mmdet 2.11's `schedule_1x` with AdamW.

Both repositories' RetinaNet configs train 12 epochs with mmcv's StepLrUpdaterHook
(`policy='step'`, by epoch): the rate is lr x gamma^k after k of the `steps` epochs (8 and 11,
gamma 0.1) have passed, with a linear warmup over the first `warmup_iters` iterations (500) from
`warmup_ratio` (0.001) x that rate: lr x (1 - (1 - i / warmup_iters)(1 - warmup_ratio)) at
iteration i, as the segmentation schedules warm up (tasks/segmentation/optim.py).

AdamW (betas 0.9 / 0.999, lr 1e-4, weight decay 1e-4) with mmcv's DefaultOptimizerConstructor:
decay on every parameter except those whose name contains one of `no_decay_keys` (BiFormer's
configs: none; DeBiFormer's paramwise_cfg: 'bn' and 'norm'). No gradient clipping
(`grad_clip=None`) in either.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from biformer_jax.tasks.segmentation.optim import decay_mask
from biformer_jax.training import optim as training_optim

SCHEDULES = ("step",)


def lr_schedule(optim_cfg, steps_per_epoch: int) -> Callable[[jax.Array], jax.Array]:
    """step (updates done) -> learning rate, as mmcv's epoch-based step policy with iteration warmup sets it."""
    if optim_cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: detection schedules are {SCHEDULES}.")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
    base, gamma = float(optim_cfg.lr), float(optim_cfg.gamma)
    milestones = tuple(int(e) for e in optim_cfg.lr_steps)
    warmup_iters, warmup_ratio = float(optim_cfg.warmup_iters), float(optim_cfg.warmup_ratio)

    def schedule(step):
        i = jnp.asarray(step, jnp.float32)
        epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch  # exact, however many steps
        passed = sum((epoch >= m).astype(jnp.float32) for m in milestones) if milestones else 0.0
        lr = base * gamma**passed
        if warmup_iters > 0:
            k = (1.0 - i / warmup_iters) * (1.0 - warmup_ratio)
            lr = jnp.where(i < warmup_iters, lr * (1.0 - k), lr)
        return lr

    return schedule


def make_optimizer(config, steps_per_epoch: int):
    """(tx, schedule, base lr): AdamW with the configured decay rule (and clipping when set)."""
    schedule = lr_schedule(config.optim, steps_per_epoch)
    tx = training_optim.create_optimizer(config.optim, schedule, mask=decay_mask(config.optim.no_decay_keys))
    return tx, schedule, float(config.optim.lr)
