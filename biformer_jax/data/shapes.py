"""A generated segmentation dataset: shapes of four classes on textured backgrounds (no download).

Every image is a pure function of (seed, split, index): a smooth random texture with pixel noise
as the background (class 0), then two to four shapes at random places, sizes and colours, later
ones drawn over earlier ones: disks (1, solid), squares (2, striped), triangles (3, checkered)
and crosses (4, solid). The held-out split draws from another stream, so no image is shared.
"""

from __future__ import annotations

import functools

import numpy as np

from biformer_jax.data.seg_sources import SegArraySource

CLASS_NAMES = ("background", "disk", "square", "triangle", "cross")
_SALT = 0x5EA9E5
_SPLITS = {"train": 0, "eval": 1}


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 255]: a few random plane waves per channel, plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 190, 3)
    out = np.empty((size, size, 3), np.float32)
    for c in range(3):
        field = np.zeros((size, size), np.float32)
        for _ in range(3):
            fy, fx = rng.uniform(-6, 6, 2)
            field += np.sin(2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 2 * np.pi))
        out[..., c] = base[c] + 18 * field
    out += rng.normal(0, 12, out.shape)
    return np.clip(out, 0, 255)


def _shape_mask(kind: int, cy: float, cx: float, r: float, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = y - cy, x - cx
    if kind == 1:  # disk
        return dy**2 + dx**2 <= r**2
    if kind == 2:  # square
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if kind == 3:  # triangle pointing up: apex at cy - r, base at cy + r
        return (dy <= r) & (np.abs(dx) <= (dy + r) * 0.6)
    thick = max(r / 3, 1.5)  # cross
    return ((np.abs(dx) <= thick) & (np.abs(dy) <= r)) | ((np.abs(dy) <= thick) & (np.abs(dx) <= r))


def _fill(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) colours of a shape of `kind`: its pattern in two random colours."""
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    y, x = np.mgrid[0:size, 0:size]
    if kind == 2:
        on = (y // 3) % 2 == 0  # stripes
    elif kind == 3:
        on = ((y // 3) + (x // 3)) % 2 == 0  # checks
    else:
        on = np.ones((size, size), bool)
    return np.where(on[..., None], a, b).astype(np.float32)


def make_example(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (size, size, 3), label uint8 (size, size)) of one generated example."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_SALT, seed, _SPLITS[split], index])))
    image = _texture(rng, size)
    label = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        kind = int(rng.integers(1, len(CLASS_NAMES)))
        r = rng.uniform(size / 10, size / 4)
        cy, cx = rng.uniform(r * 0.6, size - r * 0.6, 2)
        mask = _shape_mask(kind, cy, cx, r, size)
        image[mask] = _fill(kind, rng, size)[mask]
        label[mask] = kind
    return np.round(image).astype(np.uint8), label


@functools.lru_cache(maxsize=4)
def load_shapes(size: int, num_train: int, num_eval: int, seed: int) -> dict[str, SegArraySource]:
    """{'train', 'eval'} sources of generated examples (deterministic in their arguments)."""
    out = {}
    for split, n in (("train", num_train), ("eval", num_eval)):
        pairs = [make_example(seed, split, i, size) for i in range(n)]
        out[split] = SegArraySource(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    return out
