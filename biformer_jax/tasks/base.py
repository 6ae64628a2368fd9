"""The task protocol: what the trainer, eval.py and predict.py ask of a task.

The trainer (`training/train_lib.py`) runs one loop for every task (mesh, sharded state,
checkpoints, resume, preemption, logging, best-checkpoint keeping) and asks the task, through
the methods below, for everything that depends on what is learnt: the data, the schedule, the
optimiser, the loss, the evaluation and how other weights start a run. A task is a small
stateless object; `biformer_jax.tasks.get(config)` returns the one `config.task` names.

Batches are dicts of arrays with the global batch first (the trainer shards every key over
the mesh): classification {"image" (B, S, S, 3), "label" (B,)}; segmentation {"image" (B, h, w,
3), "label" (B, h, w)}; detection {"image" (B, h, w, 3)} plus padded {"gt_bboxes" (B, M, 4),
"gt_labels" (B, M), "gt_valid" (B, M), "pad_shape" (B, 2)} (Mask R-CNN also "gt_masks" (B, M, h, w / 8)
bit-packed). The evaluation returns scalars keyed by name
("top1", "mIoU", "bbox_mAP", ...): config.checkpoint.best_metric names one of them, prefixed
"eval/" or "eval_ema/".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
from etils import epath

from biformer_jax import storage

EVAL_RESULTS_FILE = "eval_results.json"


class Task(Protocol):
    """One learning problem the trainer runs. `run` below is the trainer's `Setup` (mesh, info,
    model, meta, shardings, ...); `info` what `dataset_info` returned."""

    name: str

    def dataset_info(self, config) -> Any:
        """The dataset's sizes: .num_classes, .num_train_examples, .num_eval_examples and .image_size
        (the side of square train inputs, or (h, w)); raises DatasetNotPreparedError saying how to fix it."""

    def schedule_lengths(self, config, info) -> tuple[int, int]:
        """(steps_per_epoch, total_steps) of the run."""

    def make_optimizer(self, config, steps_per_epoch: int, total_steps: int) -> tuple[Any, Callable, float]:
        """(optax transformation, schedule: step -> lr, base learning rate)."""

    def model_meta(self, config, info) -> dict[str, Any]:
        """What checkpoints record: {"model", "model_kwargs"} (restore.check_architecture compares it) and
        whatever inference needs without the config (classification: "data", the eval preprocessing)."""

    def init_from(self, config, meta: Mapping[str, Any]) -> Callable[[Any, Any], Any]:
        """Checks config.init_from's checkpoint against `meta` (before anything compiles) and returns
        (fresh state, shardings) -> the state with its weights. Another architecture is refused with
        its differences, except where the task defines a legitimate change (a classifier's width; a
        classifier's backbone under a segmentation model, merged by name). A scanning model's state
        keeps each stage's blocks stacked (models.block_layout): merge into
        `training.checkpoint.host_variables(state)` (per block, as checkpoints are) and place the
        result with `training.checkpoint.with_variables`, which stacks it."""

    def bind_train_step(self, config, model, tx, schedule, info) -> Callable:
        """(state, global batch) -> (state, training.metrics.TrainMetrics); pure, not jitted (the
        trainer jits it over the mesh). Built from training.steps (loss_and_grads, apply_gradients)."""

    def train_iterator(self, config, start_step: int) -> Iterator[dict[str, Any]]:
        """This host's rows of global steps start_step + 1, ...: a pure function of (config, step)."""

    def make_evaluator(self, config, run) -> Callable[[Any, str], dict[str, float]]:
        """(variables, desc) -> scalar metrics over the eval split (every process calls it)."""

    def evaluate_checkpoint(self, config, checkpoint_path: str) -> dict[str, Any]:
        """eval.py: the checkpoint's metrics (raw weights, "ema": {...} when it has EMA weights), with
        "checkpoint", "step", "model", "dataset"; refuses a checkpoint of another architecture."""

    def predict_batch(self, model, variables, images) -> Any:
        """The model's answer for one batch of preprocessed images (N, H, W, 3): classification logits
        (N, K); segmentation logits (N, h, w, K); detection `Detections` (boxes (N, 100, 4), ...).
        What predict.py, export and visualize apply."""


def host_rows(config, start_step: int) -> dict[str, Any]:
    """The train iterators' common arguments: this process's rows of the global batches from start_step."""
    return {
        "seed": config.seed,
        "start_step": start_step,
        "global_batch_size": config.global_batch_size,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
    }


def write_results(path: str | os.PathLike, record: dict[str, Any]) -> epath.Path:
    """Writes `record` as JSON at `path` (gs://, s3:// or local; a directory gets eval_results.json).

    Written to a temporary sibling and renamed over `path` (a previous result is replaced), so `path`
    is never half-written. Raises OSError (or the filesystem's error) where it cannot write.
    """
    target = storage.as_path(path)
    if target.is_dir():
        target = target / EVAL_RESULTS_FILE
    return storage.write_atomically(target, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
