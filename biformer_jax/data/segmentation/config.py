"""Segmentation data and evaluation configs: every field the segmentation pipeline reads.

Defaults are the official ADE20K recipe of BiFormer's and DeBiFormer's mmsegmentation configs
(`configs/_base_/datasets/ade20k_*.py`): LoadAnnotations(reduce_zero_label=True), Resize to scale
(2048, 512) with ratio range (0.5, 2.0) keeping the aspect, RandomCrop 512x512 with
cat_max_ratio 0.75, RandomFlip 0.5, PhotoMetricDistortion, Normalize (ImageNet mean/std),
Pad to 512x512 (image 0, label 255); test: the shorter side to 512 (longer side at most 2048),
AlignResize to multiples of 32, whole-image inference.
"""

from __future__ import annotations

import ml_collections

from biformer_jax.data.config import BAD_IMAGES, IMAGENET_MEAN, IMAGENET_STD

SEG_DATASETS = ("ade20k", "seg_folder", "shapes")
EVAL_MODES = ("whole", "slide")
MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def default_seg_config() -> ml_collections.ConfigDict:
    """The segmentation data config (the trainer keeps it at `config.data`): ADE20K, official."""
    c = ml_collections.ConfigDict()
    # 'ade20k' (the ADEChallengeData2016 folder) | 'seg_folder' (any images + PNG label maps +
    # classes.txt in the same layout) | 'shapes' (generated in memory: the quickstart).
    c.name = "ade20k"
    # ade20k: the ADEChallengeData2016 folder; seg_folder: the root of the same layout:
    #   <root>/images/<split>/<name>.jpg (or .png, ...)   <root>/annotations/<split>/<name>.png
    c.root = ""
    c.train_split = "training"
    c.eval_split = "validation"
    # seg_folder: file of class names, one per line ('' = <root>/classes.txt). Its length is the
    # number of classes (after reduce_zero_label).
    c.class_names_file = ""
    # Label 0 -> ignored (255), every other label -1, before anything else (ADE20K: True, its 0
    # is "other"). Label values must then be < num_classes or 255.
    c.reduce_zero_label = True
    c.ignore_index = 255

    # --- Train pipeline (mmseg transforms, in this order).
    c.scale = (2048, 512)  # Resize img_scale (long, short) before the ratio
    c.ratio_range = (0.5, 2.0)  # scale x uniform(ratio_range), aspect kept (mmcv imrescale)
    c.crop_size = (512, 512)  # RandomCrop (h, w), then Pad to it
    c.cat_max_ratio = 0.75  # re-draw the crop (up to 10 times) while one class covers more
    c.flip_prob = 0.5  # horizontal
    c.photometric = True  # PhotoMetricDistortion (brightness, contrast, saturation, hue)
    c.mean = IMAGENET_MEAN  # on [0, 1] pixels (x 255: mmseg's 123.675, 116.28, 103.53)
    c.std = IMAGENET_STD

    # --- Host-side execution (grain). Outputs do not depend on these.
    c.workers = 0
    c.threads = 8
    c.prefetch = 4
    c.cache = False  # keep the encoded files in memory after the first read (small datasets)
    # An image or label file that cannot be decoded (truncated, not an image): 'error' stops
    # with its path; 'skip' logs its path and uses the next readable example instead.
    c.bad_images = "error"

    # --- name='shapes': generated images of shapes (one class each) on textured backgrounds.
    c.shapes = ml_collections.ConfigDict()
    c.shapes.size = 64  # image side
    c.shapes.num_train = 512
    c.shapes.num_eval = 128  # held out: drawn from another seed
    c.shapes.seed = 0
    return c


def default_eval_config() -> ml_collections.ConfigDict:
    """How `eval.py` / the trainer's evaluation run a segmentation model (`config.eval`)."""
    c = ml_collections.ConfigDict()
    c.mode = "whole"  # 'whole' image, or 'slide' (crop_size windows every stride pixels)
    c.scale = (2048, 512)  # test img_scale (long, short): the shorter side to 512, aspect kept
    # AlignResize: resize (not pad) the rescaled image to multiples of this (0 = off, plain
    # Resize as the UperNet configs' test pipeline).
    c.size_divisor = 32
    c.crop_size = (512, 512)  # slide mode window (h, w)
    c.stride = (341, 341)  # slide mode stride (h, w)
    # Multi-scale: the test scale times each ratio; softmax outputs averaged at the label's size.
    c.ratios = (1.0,)
    c.flip = False  # also every ratio horizontally flipped
    # Shortcut: ratios (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) with flips (the papers' "MS + flip").
    c.multi_scale_flip = False
    c.max_examples = -1  # -1: the whole eval split; k > 0: its first k images
    return c


def eval_views(eval_cfg) -> tuple[tuple[float, bool], ...]:
    """The (ratio, flip) pairs of one image's test-time augmentation, in mmseg's order."""
    ratios = MULTI_SCALE_RATIOS if eval_cfg.multi_scale_flip else tuple(eval_cfg.ratios)
    flips = (False, True) if (eval_cfg.flip or eval_cfg.multi_scale_flip) else (False,)
    return tuple((float(r), f) for r in ratios for f in flips)


def shapes_config(size: int = 64) -> ml_collections.ConfigDict:
    """default_seg_config() set up for the generated shapes (the quickstart)."""
    c = default_seg_config()
    c.name = "shapes"
    c.reduce_zero_label = False  # class 0 is the background, a real class here
    c.shapes.size = size
    c.scale = (2 * size, size)
    c.ratio_range = (0.75, 1.5)
    c.crop_size = (size, size)
    c.threads = 2
    c.prefetch = 2
    return c


def validate_seg_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the bad field and its allowed values."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"segmentation data config: {message}")

    need(cfg.name in SEG_DATASETS, f"name {cfg.name!r} is not one of {SEG_DATASETS}.")
    if cfg.name in ("ade20k", "seg_folder"):
        need(bool(cfg.root), f"name={cfg.name!r} needs root=<folder> (images/<split>, annotations/<split>).")
    need(len(cfg.scale) == 2 and min(cfg.scale) > 0, f"scale must be (long, short) > 0, got {cfg.scale}.")
    need(
        len(cfg.ratio_range) == 2 and 0 < cfg.ratio_range[0] <= cfg.ratio_range[1],
        f"ratio_range must be (min, max) with 0 < min <= max, got {cfg.ratio_range}.",
    )
    need(len(cfg.crop_size) == 2 and min(cfg.crop_size) > 0, f"crop_size must be (h, w) > 0, got {cfg.crop_size}.")
    need(0 < cfg.cat_max_ratio <= 1, f"cat_max_ratio must be in (0, 1] (1 = off), got {cfg.cat_max_ratio}.")
    need(0 <= cfg.flip_prob <= 1, f"flip_prob is a probability, got {cfg.flip_prob}.")
    need(0 <= cfg.ignore_index <= 255, f"ignore_index must be in [0, 255], got {cfg.ignore_index}.")
    need(len(cfg.mean) == 3 and len(cfg.std) == 3 and min(cfg.std) > 0, "mean and std need 3 values, std > 0.")
    need(cfg.workers >= 0 and cfg.threads >= 1 and cfg.prefetch >= 1, "need workers >= 0, threads >= 1, prefetch >= 1.")
    need(cfg.bad_images in BAD_IMAGES, f"bad_images {cfg.bad_images!r} is not one of {BAD_IMAGES}.")
    if cfg.name == "shapes":
        need(cfg.shapes.size >= 16, f"shapes.size must be >= 16, got {cfg.shapes.size}.")
        need(cfg.shapes.num_train > 0 and cfg.shapes.num_eval > 0, "shapes.num_train and num_eval must be > 0.")


def validate_eval_config(cfg: ml_collections.ConfigDict) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"segmentation eval config: {message}")

    need(cfg.mode in EVAL_MODES, f"mode {cfg.mode!r} is not one of {EVAL_MODES} (--config.eval.mode=whole|slide).")
    need(len(cfg.scale) == 2 and min(cfg.scale) > 0, f"scale must be (long, short) > 0, got {cfg.scale}.")
    need(cfg.size_divisor >= 0, f"size_divisor must be >= 0 (0 = off), got {cfg.size_divisor}.")
    need(len(cfg.crop_size) == 2 and min(cfg.crop_size) > 0, f"crop_size must be (h, w) > 0, got {cfg.crop_size}.")
    need(len(cfg.stride) == 2 and min(cfg.stride) > 0, f"stride must be (h, w) > 0, got {cfg.stride}.")
    need(len(cfg.ratios) >= 1 and min(cfg.ratios) > 0, f"ratios must be positive, got {cfg.ratios}.")
