"""The detection task's data: where config.data points, the parsed splits (read once per process), sizes.

`config.data.name`: "coco" (COCO 2017 at `config.data.root`: annotations/instances_{split}.json
and the image folders) or "synthetic" (a tiny generated dataset in COCO's layout, written on first
use to `config.data.root`, or to a folder under the system's temporary directory named by its
parameters when root is empty: the quickstart's). A missing COCO folder or annotation file raises
`DatasetNotPreparedError` naming the path and how to fix it.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from biformer_jax.data.detection import coco, synthetic
from biformer_jax.data.detection import pipeline as det_pipeline
from biformer_jax.data.sources import DatasetNotPreparedError
from biformer_jax.tasks.detection import family

DATASETS = ("coco", "synthetic")
COCO_HELP = (
    "Download COCO 2017 (https://cocodataset.org/#download: train2017.zip, val2017.zip, "
    "annotations_trainval2017.zip) and unpack them into one folder ROOT holding annotations/, train2017/ "
    "and val2017/; then pass --config.data.root=ROOT."
)


@dataclasses.dataclass(frozen=True)
class DetDatasetInfo:
    """What the trainer reads (num_classes, counts, image_size: the (h, w) the model is initialised at)
    and the train split's steps per epoch (mmdet's GroupSampler with the buckets)."""

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    image_size: tuple[int, int]
    steps_per_epoch: int
    class_names: tuple[str, ...]


def dataset_root(data_cfg) -> str:
    """The folder holding annotations/ and the split folders (generated first for name='synthetic')."""
    if data_cfg.name not in DATASETS:
        raise ValueError(f"config.data.name={data_cfg.name!r} is not one of {DATASETS}.")
    if data_cfg.name == "synthetic":
        s = data_cfg.synthetic
        size, obj = tuple(s.size), tuple(s.object_size)
        args = (s.num_train, s.num_val, size, s.seed, s.max_objects, obj)
        root = data_cfg.root or synthetic.default_root(*args)
        return synthetic.write_synthetic_coco(
            root,
            num_train=s.num_train,
            num_val=s.num_val,
            size=size,
            seed=s.seed,
            max_objects=s.max_objects,
            obj_range=obj,
        )
    if not data_cfg.root:
        raise DatasetNotPreparedError(f"config.data.root is not set: COCO 2017 is needed. {COCO_HELP}")
    return data_cfg.root


def split_paths(data_cfg, split: str) -> tuple[str, str]:
    """(annotation file, image folder) of `split`; DatasetNotPreparedError where either is missing."""
    root = dataset_root(data_cfg)
    annotations, images = coco.coco_paths(root, split)
    for path, what in ((annotations, "annotation file"), (images, "image folder")):
        exists = os.path.isfile(path) if what == "annotation file" else os.path.isdir(path)
        if not exists:
            raise DatasetNotPreparedError(f"COCO {what} {path} not found (config.data.root={root!r}). {COCO_HELP}")
    return annotations, images


@functools.lru_cache(maxsize=8)
def _read(annotation_file: str, image_dir: str, train: bool, on_bad_box: str, with_mask: bool) -> coco.CocoDetection:
    return coco.read_coco(annotation_file, image_dir, train=train, on_bad_box=on_bad_box, with_mask=with_mask)


def read_split(data_cfg, which: str, with_mask: bool = False) -> coco.CocoDetection:
    """The parsed train ('train': images without boxes skipped, as mmdet) or eval split, cached per process;
    `with_mask`: each box's segmentation kept (and checked) for Mask R-CNN's training.

    The eval split keeps its first `data.max_eval_examples` images when that is > 0 (its COCO
    ground truth keeps every image; the evaluation names the ones it scores).
    """
    split = data_cfg.train_split if which == "train" else data_cfg.eval_split
    ds = _read(*split_paths(data_cfg, split), which == "train", data_cfg.on_bad_box, bool(with_mask))
    limit = int(data_cfg.get("max_eval_examples", 0))
    if which == "eval" and limit > 0 and len(ds.images) > limit:
        ds = dataclasses.replace(ds, images=ds.images[:limit])
    return ds


def pipeline_kwargs(data_cfg) -> dict:
    """The arguments det_train_iterator / det_eval_iterator share, from config.data."""
    return dict(
        buckets=tuple(tuple(int(v) for v in b) for b in data_cfg.buckets),
        max_boxes=int(data_cfg.max_boxes),
        max_ignore=int(data_cfg.max_ignore),
        scale=tuple(data_cfg.img_scale),
        threads=int(data_cfg.threads),
        prefetch=int(data_cfg.prefetch),
        workers=int(data_cfg.workers),
    )


def dataset_info(config) -> DetDatasetInfo:
    """Sizes of the configured dataset (both splits parsed, the train split's buckets assigned; a Mask
    R-CNN's train split with its segmentations, so a bad one is named before anything compiles)."""
    data_cfg = config.data
    train, evaluation = read_split(data_cfg, "train", family.with_mask(config)), read_split(data_cfg, "eval")
    if not train.images:
        raise DatasetNotPreparedError(f"{train.annotation_file} holds no image with a box to train on.")
    if train.cat_ids != evaluation.cat_ids:
        raise ValueError(
            f"the train and eval annotations list other categories ({train.cat_ids} vs {evaluation.cat_ids})."
        )
    kw = pipeline_kwargs(data_cfg)
    buckets = det_pipeline.assign_buckets(train, kw["buckets"], kw["scale"])
    sampler = det_pipeline.BucketSampler(buckets, int(config.global_batch_size), int(config.seed))
    smallest = min(kw["buckets"], key=lambda b: b[0] * b[1])
    return DetDatasetInfo(
        num_classes=train.num_classes,
        num_train_examples=len(train.images),
        num_eval_examples=len(evaluation.images),
        image_size=(int(smallest[0]), int(smallest[1])),
        steps_per_epoch=sampler.steps_per_epoch,
        class_names=tuple(train.class_names),
    )
