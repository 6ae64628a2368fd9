"""Random erasing (Zhong et al. 2017) with timm's semantics, on normalised float images.

timm's RandomErasing, as DeiT / the official recipe use it (reprob 0.25, mode 'pixel', count 1):
with probability `prob`, `count` boxes (count uniform in [min_count, max_count]) each of area
uniform in [min_area, max_area] / count of the image and aspect (h / w) log-uniform in
[min_aspect, 1 / min_aspect], placed uniformly; a box that does not fit is redrawn up to 10
times, then skipped. Erased pixels become N(0, 1) noise per pixel ('pixel'), one N(0, 1) colour
per box ('rand') or 0 ('const'): values in normalised space, i.e. around the dataset mean.
"""

from __future__ import annotations

import math

import numpy as np


def erase_boxes(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    min_count: int = 1,
    max_count: int = 1,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
) -> list[tuple[int, int, int, int]]:
    """The boxes (top, left, h, w) one erasing draws (the `prob` coin is the caller's)."""
    count = min_count if min_count == max_count else int(rng.integers(min_count, max_count + 1))
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    area = height * width
    boxes = []
    for _ in range(count):
        for _attempt in range(10):
            target_area = rng.uniform(min_area, max_area) * area / count
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                boxes.append((top, left, h, w))
                break
    return boxes


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    prob: float,
    mode: str = "pixel",
    min_count: int = 1,
    max_count: int = 1,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """Erases boxes of a float (H, W, C) image with probability `prob`; returns a new array."""
    if rng.random() > prob:
        return image
    height, width, channels = image.shape
    out = image.copy()
    boxes = erase_boxes(
        rng,
        height,
        width,
        min_count=min_count,
        max_count=max_count,
        min_area=min_area,
        max_area=max_area,
        min_aspect=min_aspect,
    )
    for top, left, h, w in boxes:
        if mode == "pixel":
            fill = rng.standard_normal((h, w, channels), dtype=np.float32)
        elif mode == "rand":
            fill = rng.standard_normal((1, 1, channels), dtype=np.float32)
        else:
            fill = np.zeros((1, 1, channels), np.float32)
        out[top : top + h, left : left + w] = fill.astype(out.dtype)
    return out
