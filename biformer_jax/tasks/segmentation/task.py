"""Semantic segmentation (`config.task = "segmentation"`): mmseg's ADE20K recipes.

Iteration-based: config.num_train_steps with mmcv's schedules and AdamW (no batch-size
scaling), mmseg's loss (tasks/segmentation/steps.py), mIoU / mAcc / aAcc with the config's
inference mode (whole, slide, multi-scale + flip). `init_from` takes a classifier's backbone
(merged by name: the classifier's norm and head dropped, the neck and heads fresh) or a
segmentation checkpoint of the same architecture (another number of classes allowed, other
fields only when named in config.init_from_overrides).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from absl import logging

from biformer_jax.data.segmentation import pipeline as seg_pipeline
from biformer_jax.data.segmentation import sources as seg_sources
from biformer_jax.models import from_config
from biformer_jax.models.segmentation import SEGMENTATION_VARIANTS
from biformer_jax.tasks.base import host_rows
from biformer_jax.tasks.segmentation import checkpoint_eval
from biformer_jax.tasks.segmentation import evaluate as seg_evaluate
from biformer_jax.tasks.segmentation import init as seg_init
from biformer_jax.tasks.segmentation import optim as seg_optim
from biformer_jax.tasks.segmentation import steps as seg_steps
from biformer_jax.training import checkpoint, restore


def schedule_lengths(config, info) -> tuple[int, int]:
    """(steps per pass over the train split, total steps = config.num_train_steps)."""
    if config.num_train_steps <= 0:
        raise ValueError("A segmentation run is iteration-based: set config.num_train_steps > 0.")
    if config.global_batch_size > info.num_train_examples:
        raise ValueError(
            f"global_batch_size={config.global_batch_size} is larger than the {info.num_train_examples} "
            "training images; lower it."
        )
    return info.num_train_examples // config.global_batch_size, int(config.num_train_steps)


def make_optimizer(config, total_steps: int):
    """(tx, schedule, base lr): mmcv's AdamW and iteration schedule (no batch-size scaling)."""
    schedule = seg_optim.lr_schedule(config.optim, total_steps)
    return seg_optim.create_optimizer(config.optim, schedule), schedule, float(config.optim.lr)


def loss_config(config) -> dict[str, Any]:
    return {
        "ignore_index": int(config.data.ignore_index),
        "avg_non_ignore": bool(config.loss.avg_non_ignore),
        "aux_weight": float(config.loss.aux_weight),
    }


def bind_train_step(config, model, tx, schedule):
    """`seg_train_step` with the config's loss, EMA and accumulation (not jitted)."""
    return functools.partial(
        seg_steps.seg_train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        loss_cfg=loss_config(config),
        ema_decay=config.ema_decay,
        grad_accum_steps=int(config.grad_accum_steps),
    )


def train_iterator(config, start_step: int):
    return seg_pipeline.seg_train_iterator(config.data, **host_rows(config, start_step))


def evaluate(model, variables, config, desc: str) -> dict[str, float]:
    """{"mIoU", "mAcc", "aAcc"} of `variables` on the eval split (config.eval's inference)."""
    return seg_evaluate.scalars(seg_evaluate.evaluate(model, variables, config.data, config.eval, desc=desc))


def check_init_from(config, meta) -> checkpoint.CheckpointRef:
    """config.init_from's checkpoint; one of another segmentation architecture is refused with its differences.

    A classifier's checkpoint (its record names a classifier) is a backbone: merged by name in
    `init_from`, where every backbone array must fit.
    """
    ref = checkpoint.resolve(config.init_from)
    if checkpoint.load_meta(ref).get("model") in SEGMENTATION_VARIANTS:
        allow = ("num_classes", *config.init_from_overrides)
        restore.check_architecture(ref, meta, what="config.init_from", allow=allow, hint=restore.INIT_FROM_HINT)
    return ref


def init_from(config, state, shardings, ref: checkpoint.CheckpointRef | None = None):
    """state with config.init_from's weights: a segmentation checkpoint, or a classifier's backbone."""
    ref = ref or checkpoint.resolve(config.init_from)
    saved = checkpoint.load_variables(ref)  # host numpy
    merged, report = seg_init.merge_weights(saved, checkpoint.host_variables(state), f"{ref.path}")
    logging.info(
        "init_from %s: loaded %d arrays; %d start fresh (%s); dropped %s.",
        ref.path,
        len(report["loaded"]),
        len(report["fresh"]),
        ", ".join(sorted({"/".join(n.split("/")[:3]) for n in report["fresh"]})) or "none",
        ", ".join(report["dropped"]) or "nothing",
    )

    return checkpoint.with_variables(state, merged, shardings)


class SegmentationTask:
    """The segmentation task (see tasks.base.Task for what each method promises)."""

    name = "segmentation"

    def dataset_info(self, config) -> seg_sources.SegDatasetInfo:
        return seg_sources.seg_dataset_info(config.data)

    def schedule_lengths(self, config, info) -> tuple[int, int]:
        return schedule_lengths(config, info)

    def make_optimizer(self, config, steps_per_epoch: int, total_steps: int):
        return make_optimizer(config, total_steps)

    def model_meta(self, config, info) -> dict[str, Any]:
        return from_config.model_meta(config, info.num_classes)

    def init_from(self, config, meta):
        ref = check_init_from(config, meta)  # before anything compiles
        return lambda state, shardings: init_from(config, state, shardings, ref)

    def bind_train_step(self, config, model, tx, schedule, info):
        return bind_train_step(config, model, tx, schedule)

    def train_iterator(self, config, start_step: int):
        return train_iterator(config, start_step)

    def make_evaluator(self, config, run):
        return lambda variables, desc: evaluate(run.model, variables, config, desc)

    def evaluate_checkpoint(self, config, checkpoint_path: str) -> dict[str, Any]:
        return checkpoint_eval.evaluate_checkpoint(config, checkpoint_path)

    def predict_batch(self, model, variables, images) -> jax.Array:
        return model.apply(variables, images, train=False)  # (N, H / 4, W / 4, num_classes)
