"""What the trainer does differently for a segmentation config (`config.task == "segmentation"`).

`training/train_lib.py` runs one loop for both tasks (iteration schedules, checkpoints, resume,
preemption, sharding, sweeps); for segmentation it takes from here: the dataset's info, the
schedule length (config.num_train_steps), mmcv's optimiser and schedule, the train step (mmseg's
loss), the train batches, the evaluation (mIoU / mAcc / aAcc) and init_from of a classifier's
backbone.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from absl import logging

from biformer_jax.data import seg_pipeline, seg_sources
from biformer_jax.segmentation import evaluate as seg_evaluate
from biformer_jax.segmentation import init as seg_init
from biformer_jax.segmentation import optim as seg_optim
from biformer_jax.segmentation import steps as seg_steps
from biformer_jax.training import checkpoint


def is_segmentation(config) -> bool:
    return "task" in config and config.task == "segmentation"


def dataset_info(config) -> seg_sources.SegDatasetInfo:
    return seg_sources.seg_dataset_info(config.data)


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
    return seg_pipeline.seg_train_iterator(
        config.data,
        seed=config.seed,
        start_step=start_step,
        global_batch_size=config.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def evaluate(model, variables, config, desc: str) -> dict[str, float]:
    """{"mIoU", "mAcc", "aAcc"} of `variables` on the eval split (config.eval's inference)."""
    return seg_evaluate.scalars(seg_evaluate.evaluate(model, variables, config.data, config.eval, desc=desc))


def init_from(config, state, shardings):
    """state with config.init_from's weights: a segmentation checkpoint, or a classifier's backbone."""
    ref = checkpoint.resolve(config.init_from)
    saved = checkpoint.load_variables(ref)  # host numpy
    merged, report = seg_init.merge_weights(saved, jax.device_get(state.variables), f"{ref.path}")
    logging.info(
        "init_from %s: loaded %d arrays; %d start fresh (%s); dropped %s.",
        ref.path,
        len(report["loaded"]),
        len(report["fresh"]),
        ", ".join(sorted({"/".join(n.split("/")[:3]) for n in report["fresh"]})) or "none",
        ", ".join(report["dropped"]) or "nothing",
    )

    def place(value, like, leaf_sharding):
        value = np.asarray(value, dtype=like.dtype)
        return jax.make_array_from_callback(value.shape, leaf_sharding, lambda index: value[index])

    variables = jax.tree.map(place, merged, state.variables, shardings.variables)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    if state.has_ema:
        ema = jax.tree.map(lambda x: x.copy(), variables)
        state = state.replace(ema_params=ema["params"], ema_batch_stats=ema["batch_stats"])
    return state
