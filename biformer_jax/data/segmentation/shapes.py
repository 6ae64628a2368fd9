"""A generated segmentation dataset: shapes of four classes on textured backgrounds (no download).

Every image is a pure function of (seed, split, index): a pale random texture with pixel noise
as the background (class 0), then two to four shapes at random places and sizes, later ones
drawn over earlier ones: disks (1, solid), squares (2, striped), triangles (3, checkered) and
crosses (4, solid), each in saturated shades of its class's hue (jittered). Colour, pattern and
outline all tell the classes apart, so a micro model learns them in minutes on a CPU. The
held-out split draws from another stream, so no image is shared.
"""

from __future__ import annotations

import functools

import numpy as np

from biformer_jax.data.sources import ArrayPairSource

CLASS_NAMES = ("background", "disk", "square", "triangle", "cross")
_SALT = 0x5EA9E5
_SPLITS = {"train": 0, "eval": 1}


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] -> RGB in [0, 255] (float), elementwise over any shape."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1) * 255.0


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 255]: pale random plane waves of one random tint, plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    field = np.zeros((size, size), np.float32)
    for _ in range(3):
        fy, fx = rng.uniform(-6, 6, 2)
        field += np.sin(2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 2 * np.pi))
    value = np.clip(rng.uniform(0.35, 0.75) + 0.08 * field, 0, 1)
    out = _hsv(np.full_like(value, rng.uniform()), np.full_like(value, rng.uniform(0, 0.2)), value)
    return np.clip(out + rng.normal(0, 8, out.shape), 0, 255)


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
    """(size, size, 3) colours of a shape of `kind`: its pattern in two shades of its class's hue.

    Hues are a quarter turn apart (red, chartreuse, cyan, violet) and jittered by +-0.05 turn,
    saturated (0.6-1), unlike the pale backgrounds (saturation <= 0.2).
    """
    hue = (kind - 1) / 4 + rng.uniform(-0.05, 0.05)
    sat = rng.uniform(0.6, 1.0)
    a, b = (
        _hsv(np.array(hue), np.array(sat), np.array(rng.uniform(0.75, 1.0))),
        _hsv(np.array(hue), np.array(sat), np.array(rng.uniform(0.35, 0.6))),
    )
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
def load_shapes(size: int, num_train: int, num_eval: int, seed: int) -> dict[str, ArrayPairSource]:
    """{'train', 'eval'} sources of generated examples (deterministic in their arguments)."""
    out = {}
    for split, n in (("train", num_train), ("eval", num_eval)):
        pairs = [make_example(seed, split, i, size) for i in range(n)]
        out[split] = ArrayPairSource(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    return out
