"""The official segmentation optimiser and iteration schedules (mmcv's LrUpdaterHooks).

Both repositories train with mmseg's IterBasedRunner, which steps the schedule every iteration
(`by_epoch=False`); mmcv computes, for iteration i (updates done so far) of `total`:

* 'cosine' (CosineAnnealing): lr_min + (lr - lr_min) (1 + cos(pi i / total)) / 2, lr_min = lr x min_lr_ratio;
* 'poly': (lr - min_lr) (1 - i / total) ** power + min_lr;
* linear warmup for i < warmup_iters multiplies that value by 1 - (1 - i / warmup_iters)(1 - warmup_ratio),
  i.e. it starts at warmup_ratio x the schedule (SFPN: 0.1 over 1000 iterations; UperNet: 1e-6
  over 1500).

AdamW is torch.optim.AdamW (optax.adamw computes the same update). Weight decay follows mmcv's
DefaultOptimizerConstructor: on every parameter (biases and norms too: Semantic FPN), except
those whose name contains one of `no_decay_keys` (UperNet's paramwise_cfg: 'norm', which in these
models means the LayerNorms and extra_norms; the BatchNorms are named by index or 'bn' and keep
their decay, as in the official runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from biformer_jax.training import optim as training_optim

SCHEDULES = ("cosine", "poly")


def lr_schedule(optim_cfg, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """step (updates done) -> learning rate, as mmcv's iteration-based hooks set it."""
    if optim_cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: segmentation schedules are {SCHEDULES}.")
    if total_steps <= 0:
        raise ValueError(f"the run needs a positive number of steps, got {total_steps}.")
    base, total = float(optim_cfg.lr), float(total_steps)
    warmup_iters, warmup_ratio = float(optim_cfg.warmup_iters), float(optim_cfg.warmup_ratio)

    def schedule(step):
        i = jnp.asarray(step, jnp.float32)
        progress = jnp.minimum(i / total, 1.0)
        if optim_cfg.schedule == "cosine":
            end = base * float(optim_cfg.min_lr_ratio)
            lr = end + 0.5 * (base - end) * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            min_lr = float(optim_cfg.min_lr)
            lr = (base - min_lr) * (1.0 - progress) ** float(optim_cfg.power) + min_lr
        if warmup_iters > 0:
            k = (1.0 - i / warmup_iters) * (1.0 - warmup_ratio)
            lr = jnp.where(i < warmup_iters, lr * (1.0 - k), lr)
        return lr

    return schedule


def path_name(path) -> str:
    """A parameter's tree path as one '/'-joined string of its keys."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(no_decay_keys: Sequence[str]):
    """params -> tree of bools: True where weight decay applies (no key of no_decay_keys in the name)."""
    keys = tuple(no_decay_keys)

    def mask(params):
        return jax.tree_util.tree_map_with_path(lambda p, _: not any(k in path_name(p) for k in keys), params)

    return mask


def create_optimizer(optim_cfg, schedule: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
    """AdamW (mmcv's settings) with the configured decay rule, optionally after global-norm clipping."""
    return training_optim.create_optimizer(optim_cfg, schedule, mask=decay_mask(optim_cfg.no_decay_keys))
