"""Instance masks for Mask R-CNN: COCO segmentations read as mmdetection 2.11 reads them, its
`BitmapMasks` transforms, bit-packed batches, and pasting / RLE for the results.

- Reading (mmdet `LoadAnnotations(with_mask=True, poly2mask=True)._poly2mask`): a polygon list is
  rasterised with pycocotools (`frPyObjects` + `merge`), an uncompressed RLE (`counts` a list) is
  converted with `frPyObjects`, a compressed RLE is used as it is; `decode` gives (H, W) uint8.
  `segmentation_problem` says what makes one unusable: none at all, a polygon of fewer than 3
  points (pycocotools would read a 4-number polygon as a box), an RLE of another size than its
  image, or a mask without a pixel.
- Transforms (`BitmapMasks.rescale / flip / pad`): nearest resize to the image's resized size
  (mmcv.imrescale, cv2.INTER_NEAREST), a horizontal flip of the width axis, zeros on the bottom
  and right.
- Batches: masks are bit-packed along the width (`np.packbits`; bucket widths are multiples of
  32), 8x less host memory and transfer than uint8 (a COCO batch of 16 x 128 masks at 800 x 1344
  is 2.2 GB as uint8, 275 MB packed); the train step unpacks them (`unpack`, jnp.unpackbits).
- Results: `paste` is mmdet's `_do_paste_mask` (CPU path) in NumPy at an image's own size, the
  same arithmetic as `models.detection.roi_heads.paste_masks`; `encode` gives COCO's compressed RLE
  with `counts` as str (JSON-ready).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from biformer_jax.data.segmentation.transforms import resize_nearest


def _as_rle(seg: Any, height: int, width: int):
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons: one object may have several parts
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg.get("counts"), list):  # uncompressed RLE
        return mask_utils.frPyObjects(seg, height, width)
    return seg


def segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """Why `seg` (an annotation's "segmentation") cannot be used as an instance mask; None if it can."""
    from pycocotools import mask as mask_utils

    if not seg:
        return "has no segmentation"
    if isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, (list, tuple)) or len(poly) < 6 or len(poly) % 2:
                n = len(poly) if isinstance(poly, (list, tuple)) else type(poly).__name__
                return f"has a polygon of {n} coordinates (a polygon needs at least 3 (x, y) points)"
    elif isinstance(seg, dict):
        size = seg.get("size")
        if size is None or "counts" not in seg:
            return "has an RLE without 'size' or 'counts'"
        if [int(v) for v in size] != [height, width]:
            return f"has an RLE of size {list(size)}, not its image's [{height}, {width}]"
    else:
        return f"has a segmentation of type {type(seg).__name__} (neither polygons nor RLE)"
    if int(mask_utils.area(_as_rle(seg, height, width))) == 0:
        return "has an empty mask (no pixel inside its segmentation)"
    return None


def decode(seg: Any, height: int, width: int) -> np.ndarray:
    """(height, width) uint8 {0, 1} mask of a polygon list or an RLE (mmdet's `_poly2mask`)."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_as_rle(seg, height, width)).astype(np.uint8)


def decode_all(segs: Sequence[Any], height: int, width: int) -> np.ndarray:
    """(k, height, width) uint8 masks of k segmentations."""
    if not len(segs):
        return np.zeros((0, height, width), np.uint8)
    return np.stack([decode(s, height, width) for s in segs])


def rescale(masks: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(k, H, W) -> (k, h, w): `BitmapMasks.rescale` (nearest, cv2's source floor(i * H / h))."""
    if not len(masks):
        return np.zeros((0, *size_hw), np.uint8)
    return np.stack([resize_nearest(m, size_hw) for m in masks])


def flip(masks: np.ndarray) -> np.ndarray:
    """`BitmapMasks.flip('horizontal')` of (k, h, w) masks."""
    return masks[:, :, ::-1]


def pack(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) {0, 1} -> (..., H, W / 8) uint8, W a multiple of 8 (the batches' layout)."""
    if masks.shape[-1] % 8:
        raise ValueError(f"mask width {masks.shape[-1]} is not a multiple of 8: pad the batch shapes to 32.")
    return np.packbits(masks.astype(bool), axis=-1)


def unpack(packed):
    """Inverse of `pack` on device: (..., H, W / 8) uint8 -> (..., H, W) bool."""
    import jax.numpy as jnp

    return jnp.unpackbits(packed, axis=-1).astype(bool)


def _paste_axis(lo: float, hi: float, length: int, mask_size: int):
    """One axis of `_do_paste_mask`: (start, (n, mask_size) bilinear weights of the pixels [start, stop))."""
    start = int(max(np.floor(lo) - 1, 0))
    stop = int(min(np.ceil(hi) + 1, length))
    centres = np.arange(start, max(stop, start), dtype=np.float32) + np.float32(0.5)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = (centres - np.float32(lo)) / (np.float32(hi) - np.float32(lo)) * np.float32(2) - np.float32(1)
    g = np.where(np.isinf(g), np.float32(0), g)
    pos = ((g + np.float32(1)) * np.float32(mask_size) - np.float32(1)) / np.float32(2)
    low = np.floor(pos)
    cells = np.arange(mask_size, dtype=np.float32)
    w = (low + 1 - pos)[:, None] * (low[:, None] == cells) + (pos - low)[:, None] * ((low + 1)[:, None] == cells)
    return start, w.astype(np.float32)


def paste(probs: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5) -> np.ndarray:
    """probs (K, M, M) in [0, 1], boxes (K, 4) in the image's pixels -> (K, height, width) bool masks
    (`value >= threshold` inside mmdet's window around each box, False elsewhere)."""
    k, m = probs.shape[0], probs.shape[-1]
    out = np.zeros((k, height, width), bool)
    for i in range(k):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        y0, ry = _paste_axis(y1, y2, height, m)
        x0, rx = _paste_axis(x1, x2, width, m)
        if len(ry) and len(rx):
            value = ry @ probs[i].astype(np.float32) @ rx.T
            out[i, y0 : y0 + len(ry), x0 : x0 + len(rx)] = value >= np.float32(threshold)
    return out


def encode(mask: np.ndarray) -> dict[str, Any]:
    """(h, w) bool -> COCO compressed RLE {"size": [h, w], "counts": str}."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
