"""Data and mixup configs: every field the input pipeline reads, with what it means.

Defaults reproduce the data side of the official BiFormer ImageNet recipe (its main.py, which
uses timm / DeiT conventions): bicubic RandomResizedCrop 224 + flip, RandAugment
`rand-m9-mstd0.5-inc1`, random erasing 0.25 'pixel', 3x repeated augmentation, Mixup 0.8 /
CutMix 1.0 with label smoothing 0.1, eval resize 256 + center crop 224.
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BAD_IMAGES = ("error", "skip")
DATASET_KINDS = ("digits", "folder")  # anything else is a TFDS dataset name
TRAIN_CROPS = ("random_resized", "pad_random", "resize")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
ERASE_MODES = ("pixel", "rand", "const")
MIXUP_MODES = ("batch", "pair", "elem")


def default_config() -> ml_collections.ConfigDict:
    """The data config (the trainer keeps it at `config.data`): the official ImageNet recipe."""
    c = ml_collections.ConfigDict()

    # --- Which data.
    # 'imagenet2012' | any TFDS image-classification name ('cifar100', 'oxford_flowers102', ...;
    # a version as in 'imagenet2012:5.1.0' works) | 'folder' (ImageFolder layout) | 'digits'.
    c.name = "imagenet2012"
    # TFDS data_dir ('' = TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets); gs:// works.
    c.data_dir = ""
    # Root for name='folder': <folder>/<split>/<class name>/<image files>.
    c.folder = ""
    # Split names: TFDS split strings ('train', 'train[:90%]', ...), or subfolders for 'folder'.
    c.train_split = "train"
    # '' = the dataset's own: 'validation' (TFDS, else 'test'), 'val' (folder), 'test' (digits).
    c.eval_split = ""

    # --- Geometry.
    c.image_size = 224  # network input side, train and eval
    # Eval: resize the shorter side to this, then center-crop image_size (the official 256 / 224,
    # i.e. crop_pct 0.875; for another image_size use int(image_size * 256 / 224)).
    c.eval_resize = 256
    c.interpolation = "bicubic"  # 'bicubic' | 'bilinear' | 'nearest' (all resizes and RandAugment)
    # Train crop: 'random_resized' (timm RandomResizedCrop with scale/ratio), 'pad_random'
    # (resize to image_size, zero-pad crop_padding, random crop: the official rule for <= 32 px
    # inputs) or 'resize' (resize to image_size, no crop).
    c.train_crop = "random_resized"
    c.scale = (0.08, 1.0)  # RandomResizedCrop area fraction range
    c.ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect ratio (w / h) range
    c.crop_padding = 4  # for train_crop='pad_random'

    # --- Train augmentations (each one switchable).
    c.hflip = True  # random horizontal flip, probability 0.5 (timm's default; wrong for digits)
    # timm RandAugment string, '' = off. 'rand-m9-mstd0.5-inc1': magnitude 9 of 10, magnitude
    # noise std 0.5, the increasing-severity op set, 2 ops per image, each applied with p 0.5.
    c.randaugment = "rand-m9-mstd0.5-inc1"
    # Color jitter strength for brightness/contrast/saturation (0 = off). As in timm it is
    # ignored while a RandAugment policy is set.
    c.color_jitter = 0.4
    c.reprob = 0.25  # random erasing probability per image (0 = off)
    c.remode = "pixel"  # 'pixel' (per-pixel normal noise) | 'rand' (per-channel) | 'const' (zeros)
    c.recount = 1  # max erased boxes per image (count drawn in [1, recount])
    # Repeated augmentation (DeiT RASampler): each image appears this many times per global step,
    # differently augmented, spread over the batch so copies land on different devices/hosts;
    # the epoch length stays num_train_examples. 1 = off.
    c.repeated_aug = 3
    c.mean = IMAGENET_MEAN  # normalisation, on [0, 1] pixels
    c.std = IMAGENET_STD

    # --- Host-side execution (grain). Outputs do not depend on these.
    c.workers = 0  # worker processes per host (0 = in the training process; ImageNet wants many)
    c.threads = 8  # threads per process, each building whole batches (PIL releases the GIL)
    c.prefetch = 8  # batches buffered ahead per process (memory: prefetch x batch bytes)
    # Hold the encoded records of the split in host memory after the first read (small datasets
    # on slow disks; every worker process holds its own copy).
    c.cache = False
    # An image file that cannot be decoded (truncated, not an image) in a 'folder' dataset:
    # 'error' stops with its path; 'skip' logs its path and uses the next readable file instead.
    c.bad_images = "error"

    # --- name='digits': scikit-learn's 1797 8x8 handwritten digits, shipped inside the package.
    c.digits = ml_collections.ConfigDict()
    c.digits.size = 32  # stored side: 8x8 upsampled (bicubic) to this, gray -> 3 channels
    c.digits.eval_fraction = 0.2  # held-out fraction, stratified per class
    c.digits.split_seed = 0  # fixes the train / held-out split (not the training seed)
    return c


def digits_config(image_size: int = 32) -> ml_collections.ConfigDict:
    """default_config() set up for the embedded digits: no flips, RandAugment, jitter, erasing."""
    c = default_config()
    c.name = "digits"
    c.image_size = image_size
    c.eval_resize = image_size
    c.digits.size = image_size
    c.train_crop = "pad_random"
    c.crop_padding = max(1, image_size // 16)
    c.hflip = False
    c.randaugment = ""
    c.color_jitter = 0.0
    c.reprob = 0.0
    c.repeated_aug = 1
    c.mean = (0.5, 0.5, 0.5)
    c.std = (0.5, 0.5, 0.5)
    c.threads = 2
    c.prefetch = 2
    return c


def default_mixup_config() -> ml_collections.ConfigDict:
    """The mixup config (the trainer keeps it at `config.mixup`): timm's Mixup, official values."""
    c = ml_collections.ConfigDict()
    c.mixup_alpha = 0.8  # Beta(alpha, alpha) for mixup; 0 = off
    c.cutmix_alpha = 1.0  # Beta(alpha, alpha) for cutmix; 0 = off
    # (min, max) box side fractions for cutmix (overrides cutmix_alpha and turns cutmix on); () = off.
    c.cutmix_minmax = ()
    c.prob = 1.0  # probability of mixing a batch / pair / element
    c.switch_prob = 0.5  # probability of cutmix instead of mixup when both are on
    c.mode = "batch"  # 'batch' (one draw per batch) | 'pair' | 'elem' (per element)
    c.correct_lam = True  # cutmix lambda = 1 - the clipped box's area fraction
    c.label_smoothing = 0.1  # folded into the targets (timm mixup_target)
    return c


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the bad field and its allowed values."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"data config: {message}")

    need(cfg.image_size > 0, f"image_size must be positive, got {cfg.image_size}.")
    need(
        cfg.eval_resize >= cfg.image_size,
        f"eval_resize ({cfg.eval_resize}) must be >= image_size ({cfg.image_size}).",
    )
    need(cfg.interpolation in INTERPOLATIONS, f"interpolation {cfg.interpolation!r} is not one of {INTERPOLATIONS}.")
    need(cfg.train_crop in TRAIN_CROPS, f"train_crop {cfg.train_crop!r} is not one of {TRAIN_CROPS}.")
    need(
        len(cfg.scale) == 2 and 0 < cfg.scale[0] <= cfg.scale[1] <= 1,
        f"scale must be (min, max) with 0 < min <= max <= 1, got {cfg.scale}.",
    )
    need(
        len(cfg.ratio) == 2 and 0 < cfg.ratio[0] <= cfg.ratio[1],
        f"ratio must be (min, max) with 0 < min <= max, got {cfg.ratio}.",
    )
    need(isinstance(cfg.hflip, bool), f"hflip is True / False (flip with probability 0.5), got {cfg.hflip!r}.")
    need(0.0 <= cfg.reprob <= 1.0, f"reprob is a probability, got {cfg.reprob}.")
    need(cfg.remode in ERASE_MODES, f"remode {cfg.remode!r} is not one of {ERASE_MODES}.")
    need(cfg.recount >= 1, f"recount must be >= 1, got {cfg.recount}.")
    need(cfg.repeated_aug >= 1, f"repeated_aug must be >= 1 (1 = off), got {cfg.repeated_aug}.")
    need(cfg.color_jitter >= 0, f"color_jitter must be >= 0, got {cfg.color_jitter}.")
    need(len(cfg.mean) == 3 and len(cfg.std) == 3, "mean and std need 3 values (RGB).")
    need(all(s > 0 for s in cfg.std), f"std must be positive, got {cfg.std}.")
    need(cfg.workers >= 0 and cfg.threads >= 1 and cfg.prefetch >= 1, "need workers >= 0, threads >= 1, prefetch >= 1.")
    need(cfg.bad_images in BAD_IMAGES, f"bad_images {cfg.bad_images!r} is not one of {BAD_IMAGES}.")
    if cfg.name == "folder":
        need(bool(cfg.folder), "name='folder' needs folder=<root> (holding <root>/<split>/<class>/<images>).")
    if cfg.name == "digits":
        need(cfg.digits.size >= 8, f"digits.size must be >= 8 (the source is 8x8), got {cfg.digits.size}.")
        fraction = cfg.digits.eval_fraction
        need(0 < fraction < 1, f"digits.eval_fraction must be in (0, 1), got {fraction}.")


def validate_mixup_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the bad mixup field."""
    if cfg.mode not in MIXUP_MODES:
        raise ValueError(f"mixup config: mode {cfg.mode!r} is not one of {MIXUP_MODES}.")
    if cfg.mixup_alpha < 0 or cfg.cutmix_alpha < 0:
        raise ValueError("mixup config: mixup_alpha and cutmix_alpha must be >= 0 (0 = off).")
    if cfg.cutmix_minmax and not (len(cfg.cutmix_minmax) == 2 and 0 < cfg.cutmix_minmax[0] < cfg.cutmix_minmax[1] <= 1):
        raise ValueError(f"mixup config: cutmix_minmax must be () or (min, max) in (0, 1], got {cfg.cutmix_minmax}.")
    if not (0 <= cfg.prob <= 1 and 0 <= cfg.switch_prob <= 1 and 0 <= cfg.label_smoothing < 1):
        raise ValueError("mixup config: prob and switch_prob must be in [0, 1], label_smoothing in [0, 1).")
