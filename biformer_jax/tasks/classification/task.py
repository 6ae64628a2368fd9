"""Image classification (the default task: a config without `task`): the DeiT / timm ImageNet recipe.

Epoch-based: timm's cosine schedule with warmup over `steps_per_epoch` (batch-size-scaled lr),
AdamW decaying only weights of rank > 1, Mixup / CutMix inside the jitted step, top-1 / top-5 /
loss over the eval split. `init_from` takes a checkpoint of the same architecture (a classifier
of another width is re-initialised; other fields may differ only when named in
config.init_from_overrides).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from biformer_jax import data
from biformer_jax.data.record import data_record
from biformer_jax.models import from_config
from biformer_jax.tasks.base import host_rows
from biformer_jax.tasks.classification import evaluate, steps
from biformer_jax.training import checkpoint, optim, restore


def schedule_lengths(config, num_train_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps) from the config and the dataset size."""
    # The sampler's epoch too (train_iterator gets config.steps_per_epoch): one definition.
    steps_per_epoch = data.steps_per_epoch(
        num_train_examples, config.global_batch_size, config.steps_per_epoch, config.data.repeated_aug
    )
    if config.num_train_steps > 0:
        return steps_per_epoch, int(config.num_train_steps)
    return steps_per_epoch, int((config.num_epochs + config.optim.cooldown_epochs) * steps_per_epoch)


def make_optimizer(config, steps_per_epoch: int):
    """(tx, schedule, base_lr): config.optim's optimiser and learning-rate schedule at the global batch size."""
    base_lr = optim.scaled_learning_rate(config.optim, config.global_batch_size)
    schedule = optim.lr_schedule(
        config.optim, base_lr=base_lr, steps_per_epoch=steps_per_epoch, num_epochs=config.num_epochs
    )
    return optim.create_optimizer(config.optim, schedule), schedule, base_lr


def bind_train_step(config, model, tx, schedule, num_classes: int):
    """`steps.train_step` with the config's mixup/cutmix, EMA and accumulation: (state, batch) -> (state, metrics).

    Not jitted: the trainer jits it over a run's mesh; the benchmarks jit it as it is.
    """
    mix_fn = functools.partial(data.mixup_cutmix, num_classes=num_classes, cfg=config.mixup)
    return functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        mix_fn=mix_fn,
        ema_decay=config.ema_decay,
        grad_accum_steps=int(config.grad_accum_steps),
    )


class ClassificationTask:
    """The classification task (see tasks.base.Task for what each method promises)."""

    name = "classification"

    def dataset_info(self, config) -> data.DatasetInfo:
        return data.dataset_info(config.data)

    def schedule_lengths(self, config, info) -> tuple[int, int]:
        return schedule_lengths(config, info.num_train_examples)

    def make_optimizer(self, config, steps_per_epoch: int, total_steps: int):
        return make_optimizer(config, steps_per_epoch)

    def model_meta(self, config, info) -> dict[str, Any]:
        # The model, and its input for predict.py / export (eval preprocessing, class names).
        return {**from_config.model_meta(config, info.num_classes), "data": data_record(config.data)}

    def init_from(self, config, meta):
        ref = restore.init_from_ref(config, meta)  # checked before anything compiles
        return lambda state, shardings: checkpoint.init_variables_from(ref.path, state, shardings)

    def bind_train_step(self, config, model, tx, schedule, info):
        return bind_train_step(config, model, tx, schedule, info.num_classes)

    def train_iterator(self, config, start_step: int):
        return data.train_iterator(config.data, **host_rows(config, start_step), epoch_steps=config.steps_per_epoch)

    def make_evaluator(self, config, run):
        eval_step = evaluate.make_eval_step(run.model, run.mesh, run.shardings.variables)

        def evaluator(variables, desc: str) -> dict[str, float]:
            return evaluate.evaluate(
                eval_step, variables, config=config, mesh=run.mesh, num_examples=run.info.num_eval_examples, desc=desc
            )

        return evaluator

    def evaluate_checkpoint(self, config, checkpoint_path: str) -> dict[str, Any]:
        return evaluate.evaluate_checkpoint(config, checkpoint_path)

    def predict_batch(self, model, variables, images) -> jax.Array:
        return model.apply(variables, images, train=False).astype(jnp.float32)  # (N, num_classes)
