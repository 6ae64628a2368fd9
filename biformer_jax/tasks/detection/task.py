"""Object detection (`config.task = "detection"`): RetinaNet and Mask R-CNN with mmdet 2.11's COCO recipes.

The model family (family.py) picks the loss (steps.py), whether the data carries instance masks,
and the evaluation (box AP; Mask R-CNN also mask AP, `segm`); everything else is shared.

Epoch-based: config.num_epochs over the train split in bucket-grouped batches (mmdet's
GroupSampler; data/detection/pipeline.py), mmdet's step schedule with iteration warmup and AdamW
(tasks/detection/optim.py), RetinaNet's focal + L1 loss per group of images (steps.py), COCO box
AP with pycocotools (evaluate.py). The backbone's BatchNorms are frozen (the model's norm_eval).
`init_from` takes a classifier's backbone (merged by name: the classifier's norm and head
dropped, the neck and head fresh) or a detection checkpoint of the same architecture (another
number of classes allowed: `retina_cls` then starts fresh; other fields only when named in
config.init_from_overrides).
"""

from __future__ import annotations

import functools
from typing import Any

from absl import logging

from biformer_jax.data.detection import pipeline as det_pipeline
from biformer_jax.models import from_config
from biformer_jax.models.detection import DETECTION_VARIANTS, maskrcnn, retinanet
from biformer_jax.tasks.base import host_rows
from biformer_jax.tasks.detection import data as det_data
from biformer_jax.tasks.detection import evaluate as det_evaluate
from biformer_jax.tasks.detection import family
from biformer_jax.tasks.detection import optim as det_optim
from biformer_jax.tasks.detection import steps as det_steps
from biformer_jax.tasks.segmentation import init as seg_init
from biformer_jax.training import checkpoint, restore

# (top module, layer) whose shapes follow the number of classes: RetinaNet's, then Mask R-CNN's
CLASS_LAYERS = (
    ("bbox_head", "retina_cls"),
    ("roi_head", "fc_cls"),
    ("roi_head", "fc_reg"),
    ("roi_head", "conv_logits"),
)
INIT_HINT = (
    "init_from takes a classifier checkpoint of the same backbone variant (biformer_small for "
    "retinanet_biformer_small) or a detection checkpoint of the same model; check config.model and the "
    "checkpoint's biformer_jax.json."
)


def schedule_lengths(config, info: det_data.DetDatasetInfo) -> tuple[int, int]:
    """(steps per epoch: the bucketed batches of the train split, total = config.num_epochs of them)."""
    if config.num_epochs <= 0:
        raise ValueError("A detection run is epoch-based: set config.num_epochs > 0.")
    if config.global_batch_size > info.num_train_examples:
        raise ValueError(
            f"global_batch_size={config.global_batch_size} is larger than the {info.num_train_examples} "
            "training images; lower it."
        )
    return info.steps_per_epoch, int(config.num_epochs) * info.steps_per_epoch


def bind_train_step(config, model, tx, schedule):
    """`det_train_step` with the config's EMA, accumulation and loss groups (not jitted)."""
    return functools.partial(
        det_steps.det_train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        ema_decay=config.ema_decay,
        grad_accum_steps=int(config.grad_accum_steps),
        loss_group_size=int(config.loss_group_size),
    )


def train_iterator(config, start_step: int):
    """This host's rows of the train batches, only the keys the step reads."""
    with_mask = family.with_mask(config)
    ds = det_data.read_split(config.data, "train", with_mask)
    kw = det_data.pipeline_kwargs(config.data)
    it = det_pipeline.det_train_iterator(
        ds, **host_rows(config, start_step), flip_ratio=float(config.data.flip_ratio), with_mask=with_mask, **kw
    )
    keys = det_steps.batch_keys(with_mask)
    return ({k: batch[k] for k in keys} for batch in it)


def check_init_from(config, meta) -> checkpoint.CheckpointRef:
    """config.init_from's checkpoint; a detection one of another architecture is refused with its differences."""
    ref = checkpoint.resolve(config.init_from)
    if checkpoint.load_meta(ref).get("model") in DETECTION_VARIANTS:
        allow = ("num_classes", *config.init_from_overrides)
        restore.check_architecture(ref, meta, what="config.init_from", allow=allow, hint=restore.INIT_FROM_HINT)
    return ref


def init_from(config, state, shardings, ref: checkpoint.CheckpointRef):
    """state with config.init_from's weights: a detection checkpoint, or a classifier's backbone."""
    saved = checkpoint.load_variables(ref)  # host numpy
    merged, report = seg_init.merge_weights(
        saved,
        checkpoint.host_variables(state),
        f"{ref.path}",
        class_layers=CLASS_LAYERS,
        task="detection",
        hint=INIT_HINT,
    )
    logging.info(
        "init_from %s: loaded %d arrays; %d start fresh (%s); dropped %s.",
        ref.path,
        len(report["loaded"]),
        len(report["fresh"]),
        ", ".join(sorted({"/".join(n.split("/")[:3]) for n in report["fresh"]})) or "none",
        ", ".join(report["dropped"]) or "nothing",
    )
    return checkpoint.with_variables(state, merged, shardings)


def model_meta(config, info: det_data.DetDatasetInfo) -> dict[str, Any]:
    """The model record, plus what predict.py needs without the config: the test scale and class names."""
    meta = from_config.model_meta(config, info.num_classes)
    meta["data"] = {"img_scale": [int(v) for v in config.data.img_scale], "class_names": list(info.class_names)}
    return meta


class DetectionTask:
    """The detection task (see tasks.base.Task for what each method promises)."""

    name = "detection"

    def dataset_info(self, config) -> det_data.DetDatasetInfo:
        return det_data.dataset_info(config)

    def schedule_lengths(self, config, info) -> tuple[int, int]:
        return schedule_lengths(config, info)

    def make_optimizer(self, config, steps_per_epoch: int, total_steps: int):
        return det_optim.make_optimizer(config, steps_per_epoch)

    def model_meta(self, config, info) -> dict[str, Any]:
        return model_meta(config, info)

    def init_from(self, config, meta):
        ref = check_init_from(config, meta)  # before anything compiles
        return lambda state, shardings: init_from(config, state, shardings, ref)

    def bind_train_step(self, config, model, tx, schedule, info):
        return bind_train_step(config, model, tx, schedule)

    def train_iterator(self, config, start_step: int):
        return train_iterator(config, start_step)

    def make_evaluator(self, config, run):
        return lambda variables, desc: det_evaluate.evaluate(run.model, variables, config, desc=desc)[0]

    def evaluate_checkpoint(self, config, checkpoint_path: str) -> dict[str, Any]:
        return det_evaluate.evaluate_checkpoint(config, checkpoint_path)

    def predict_batch(self, model, variables, images):
        """Detections (boxes (N, 100, 4) in input pixels, scores, labels, count; Mask R-CNN's with masks
        (N, 100, H, W) pasted at the input's size) of preprocessed images."""
        if family.is_mask_model(model):
            return maskrcnn.detect(model, variables, images)
        return retinanet.detect(model, variables, images)
