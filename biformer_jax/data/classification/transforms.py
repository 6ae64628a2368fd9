"""Host-side image transforms: crops, resizes, flips, color jitter, normalisation.

Semantics follow torchvision / timm on PIL images (what the official main.py runs), so crops
and resizes are PIL's: RandomResizedCrop picks its box as timm does (10 tries, then a center
crop with the ratio clamped), eval resizes the shorter side and center-crops. Randomness comes
from an explicit `np.random.Generator` so every example is a pure function of its seed.
"""

from __future__ import annotations

import math

import ml_collections
import numpy as np
from PIL import Image, ImageEnhance

from biformer_jax.data.classification import erasing, randaugment


def resample_filter(name: str) -> Image.Resampling:
    """'bicubic' | 'bilinear' | 'nearest' -> the PIL filter."""
    return Image.Resampling[name.upper()]


def random_resized_crop_box(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (top, left, h, w): area fraction in scale, aspect w/h in ratio.

    Up to 10 draws of (area, log-uniform aspect); the first that fits wins. Otherwise a center
    crop of the whole image with its aspect clamped into ratio (timm / torchvision fallback).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
    img: Image.Image,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    interpolation: str,
) -> Image.Image:
    """Crops a random_resized_crop_box and resizes it to (size, size)."""
    top, left, h, w = random_resized_crop_box(rng, img.width, img.height, scale, ratio)
    # Crop first: PIL's resize(box=...) would let the filter read pixels outside the box.
    return img.crop((left, top, left + w, top + h)).resize((size, size), resample_filter(interpolation))


def pad_random_crop(img: Image.Image, rng: np.random.Generator, size: int, padding: int) -> Image.Image:
    """torchvision RandomCrop(size, padding): zero-pad every side, then a uniform size x size crop."""
    padded = Image.new("RGB", (img.width + 2 * padding, img.height + 2 * padding))
    padded.paste(img, (padding, padding))
    top = int(rng.integers(0, padded.height - size + 1))
    left = int(rng.integers(0, padded.width - size + 1))
    return padded.crop((left, top, left + size, top + size))


def resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resizes so the shorter side is `size` (torchvision Resize(int): long side truncated)."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if short == size:
        return img
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return img.resize((new_w, new_h), resample_filter(interpolation))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop: offsets rounded; zero padding where the image is smaller."""
    w, h = img.size
    if w < size or h < size:
        padded = Image.new("RGB", (max(w, size), max(h, size)))
        padded.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = padded, padded.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def color_jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """torchvision ColorJitter(strength, strength, strength): factors in [1-s, 1+s], random order."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in rng.permutation(len(enhancers)):
        factor = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
        img = enhancers[k](img).enhance(factor)
    return img


def normalize(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """uint8 RGB image -> float32 (H, W, 3) array, (pixel / 255 - mean) / std."""
    x = np.asarray(img, dtype=np.float32)  # a fresh array: scaled in place below
    std = np.asarray(std, np.float32)
    x *= 1.0 / (255.0 * std)
    x -= np.asarray(mean, np.float32) / std
    return x


class TrainTransform:
    """The training transform of one example: PIL RGB image + Generator -> float32 (S, S, 3).

    Order as timm's transforms_imagenet_train: crop -> flip -> RandAugment (or color jitter)
    -> normalise -> random erasing. Picklable, so grain worker processes can run it.
    """

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.size = cfg.image_size
        self.crop = cfg.train_crop
        self.scale = tuple(cfg.scale)
        self.ratio = tuple(cfg.ratio)
        self.padding = cfg.crop_padding
        self.interpolation = cfg.interpolation
        self.hflip = 0.5 if cfg.hflip else 0.0  # flip probability
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)
        fill = tuple(min(255, round(255 * m)) for m in self.mean)
        self.randaugment = (
            randaugment.RandAugment.from_string(cfg.randaugment, fill=fill, interpolation=cfg.interpolation)
            if cfg.randaugment
            else None
        )
        # timm turns color jitter off whenever an auto-augment policy is set.
        self.color_jitter = cfg.color_jitter if self.randaugment is None else 0.0
        self.reprob, self.remode, self.recount = cfg.reprob, cfg.remode, cfg.recount

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        if self.crop == "random_resized":
            img = random_resized_crop(img, rng, self.size, self.scale, self.ratio, self.interpolation)
        else:
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), resample_filter(self.interpolation))
            if self.crop == "pad_random":
                img = pad_random_crop(img, rng, self.size, self.padding)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        elif self.color_jitter > 0:
            img = color_jitter(img, rng, self.color_jitter)
        x = normalize(img, self.mean, self.std)
        if self.reprob > 0:
            x = erasing.random_erasing(x, rng, prob=self.reprob, mode=self.remode, max_count=self.recount)
        return x


class EvalTransform:
    """The eval transform: resize the shorter side to eval_resize, center-crop, normalise.

    Deterministic: PIL RGB image -> float32 (image_size, image_size, 3).
    """

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.size, self.resize = cfg.image_size, cfg.eval_resize
        self.interpolation = cfg.interpolation
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = center_crop(resize_shorter(img, self.resize, self.interpolation), self.size)
        return normalize(img, self.mean, self.std)
