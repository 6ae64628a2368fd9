"""Tasks: what the trainer, eval.py, predict.py, export and visualize ask of a learning problem.

    from biformer_jax import tasks
    task = tasks.get(config)        # config.task names it; a config without `task` is classification
    train_lib.train_and_evaluate(config, workdir, task)

`base.Task` is the protocol; `classification/`, `segmentation/` and `detection/` implement it (each with its
steps, optimiser, evaluation and inference). The trainer (`training/`) imports none of them: it
is handed the task. Adding a task: README "Code layout", "Adding a task".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from biformer_jax.models.detection import DETECTION_VARIANTS
from biformer_jax.models.segmentation import SEGMENTATION_VARIANTS
from biformer_jax.tasks.base import EVAL_RESULTS_FILE, Task, write_results
from biformer_jax.tasks.classification.task import ClassificationTask
from biformer_jax.tasks.detection.task import DetectionTask
from biformer_jax.tasks.segmentation.task import SegmentationTask

DEFAULT = "classification"
TASKS: dict[str, Task] = {
    "classification": ClassificationTask(),
    "segmentation": SegmentationTask(),
    "detection": DetectionTask(),
}


def name_of(config) -> str:
    """config.task, or "classification" for a config without the field (every classifier config)."""
    return str(config.task) if "task" in config else DEFAULT


def get(config) -> Task:
    """The task config.task names; ValueError listing the known ones for any other name."""
    name = name_of(config)
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is not a task of this package; use one of {sorted(TASKS)}.")
    return TASKS[name]


def for_record(record: Mapping[str, Any]) -> Task:
    """The task a checkpoint's record (its meta) was trained for, read from its model: what predict.py,
    export and visualize, which take no config, ask before they load it."""
    model = record.get("model")
    if model in SEGMENTATION_VARIANTS:
        return TASKS["segmentation"]
    if model in DETECTION_VARIANTS:
        return TASKS["detection"]
    return TASKS[DEFAULT]


def require(record: Mapping[str, Any], name: str, *, where: str, instead: str) -> Task:
    """The record's task, when it is `name`; else ValueError naming the checkpoint's task and `instead`."""
    task = for_record(record)
    if task.name != name:
        raise ValueError(
            f"{where}: the checkpoint is a {task.name} model ({record.get('model')!r}), and this takes "
            f"{name} checkpoints; {instead}."
        )
    return task


__all__ = ["DEFAULT", "EVAL_RESULTS_FILE", "TASKS", "Task", "for_record", "get", "name_of", "require", "write_results"]
