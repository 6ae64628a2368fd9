"""mmdetection 2.11's RetinaNet / Mask R-CNN image transforms on numpy (image uint8 RGB, boxes xyxy).

Train, in the configs' order: Resize(img_scale=(1333, 800), keep_ratio) -> RandomFlip(0.5) ->
Normalize(ImageNet mean/std, to_rgb) -> Pad(size_divisor=32). Test: the same without the flip.

- Resize: mmcv.imrescale's size, `factor = min(1333 / long, 800 / short)`, each side
  `int(side * factor + 0.5)`; the scale factor is mmdet's per axis, `(new_w / w, new_h / h)`
  (not `factor`: rounding makes them differ slightly), boxes are multiplied by it and clipped
  to the resized image (mmdet 2.11's `bbox_clip_border=True`). The bilinear resize is OpenCV's
  (half-pixel centres, no antialiasing) in numpy, as the segmentation pipeline does it.
- Flip (horizontal, mmdet's `bbox_flip`): `x1' = W - x2`, `x2' = W - x1` with W the resized width.
- Normalize: our images are decoded as RGB already, so `to_rgb` is the identity here.
- Pad: zeros (after normalising, as mmdet pads) on the bottom and right. `pad_shape` is the
  image's own size rounded up to 32 (what mmdet records, and what the anchors' valid flags use);
  the batch itself is padded further to its bucket's fixed shape (pipeline.py).

Every size here comes from the json's (height, width) alone, so images are assigned to buckets
without decoding them.
"""

from __future__ import annotations

import math

import numpy as np

from biformer_jax.data.detection import masks
from biformer_jax.data.segmentation.transforms import rescale_size, resize_bilinear

IMG_SCALE = (1333, 800)
SIZE_DIVISOR = 32
MEAN = (123.675, 116.28, 103.53)  # RGB, mmdet's img_norm_cfg
STD = (58.395, 57.12, 57.375)

# Padded (height, width) shapes of the batches: three landscape, three portrait. At (1333, 800)
# a landscape image is 800 high unless wider than 1333:800, and at most 1344 wide after padding;
# 1088 holds 4:3 images (COCO's commonest, 640x480 -> 1067x800), 1216 holds 3:2 (640x427 ->
# 1199x800), 1344 holds the rest. Portrait images mirror them.
DEFAULT_BUCKETS = ((800, 1088), (800, 1216), (800, 1344), (1088, 800), (1216, 800), (1344, 800))


def resized_size(height: int, width: int, scale=IMG_SCALE) -> tuple[int, int]:
    """(h, w) after Resize(img_scale=scale, keep_ratio=True): mmcv.imrescale's rounding."""
    return rescale_size(height, width, tuple(scale))


def scale_factor(height: int, width: int, scale=IMG_SCALE) -> np.ndarray:
    """(4,) float32 mmdet scale factor [w_scale, h_scale, w_scale, h_scale] of an image."""
    new_h, new_w = resized_size(height, width, scale)
    return np.array([new_w / width, new_h / height] * 2, np.float32)


def pad_shape(height: int, width: int, divisor: int = SIZE_DIVISOR) -> tuple[int, int]:
    """(h, w) rounded up to multiples of `divisor` (mmdet's Pad(size_divisor))."""
    return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor


def bucket_of(height: int, width: int, buckets, scale=IMG_SCALE, divisor: int = SIZE_DIVISOR) -> int:
    """Index of the smallest bucket (by area) holding the padded resized image; an error if none does."""
    ph, pw = pad_shape(*resized_size(height, width, scale), divisor)
    fits = [(bh * bw, i) for i, (bh, bw) in enumerate(buckets) if bh >= ph and bw >= pw]
    if not fits:
        raise ValueError(
            f"a {height}x{width} image pads to {ph}x{pw} at img_scale {tuple(scale)}, larger than every bucket "
            f"{list(map(tuple, buckets))}: add a bucket of at least that size."
        )
    return min(fits)[1]


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """mmdet's horizontal bbox_flip of (k, 4) xyxy boxes in an image `width` wide."""
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def resize_boxes(boxes: np.ndarray, factor: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Boxes times the (4,) scale factor, clipped to the resized (h, w) image as mmdet 2.11 clips."""
    out = boxes.astype(np.float32) * factor
    out[:, 0::2] = np.clip(out[:, 0::2], 0, size_hw[1])
    out[:, 1::2] = np.clip(out[:, 1::2], 0, size_hw[0])
    return out


def normalize(img: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """(h, w, 3) uint8 RGB -> float32 (img - mean) / std."""
    return (img.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def transform(
    img: np.ndarray,
    boxes: np.ndarray,
    ignore: np.ndarray,
    flip: bool,
    scale=IMG_SCALE,
    divisor=SIZE_DIVISOR,
    gt_masks: np.ndarray | None = None,
) -> dict:
    """Resize -> (flip) -> normalise one image; returns the float32 (h, w, 3) image, its boxes and metas.

    Keys: image, boxes (k, 4), ignore (j, 4), img_shape (h, w), pad_shape (h, w) rounded up to
    `divisor`, ori_shape (H, W), scale_factor (4,), flip; with `gt_masks` (k, H, W) also "masks"
    (k, h, w) uint8, resized and flipped with the image (masks.py). Padding to the batch shape is
    the caller's.
    """
    height, width = img.shape[:2]
    size = resized_size(height, width, scale)
    factor = scale_factor(height, width, scale)
    image = resize_bilinear(img, size)
    boxes, ignore = resize_boxes(boxes, factor, size), resize_boxes(ignore, factor, size)
    if flip:
        image = image[:, ::-1]
        boxes, ignore = flip_boxes(boxes, size[1]), flip_boxes(ignore, size[1])
    extra = {}
    if gt_masks is not None:
        resized = masks.rescale(gt_masks, size)
        extra["masks"] = masks.flip(resized) if flip else resized
    return dict(
        image=normalize(image),
        boxes=boxes,
        ignore=ignore,
        img_shape=size,
        pad_shape=pad_shape(*size, divisor),
        ori_shape=(height, width),
        scale_factor=factor,
        flip=bool(flip),
        **extra,
    )
