"""Crops, resizes, flips and normalisation: what each must do, not only shapes."""

import math

import numpy as np
import pytest
from PIL import Image

from biformer_jax import data
from biformer_jax.data.classification import transforms


def _noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (256, 256)])
def test_random_resized_crop_respects_scale_and_ratio(width, height):
    rng = np.random.default_rng(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    areas, aspects = [], []
    for _ in range(2000):
        top, left, h, w = transforms.random_resized_crop_box(rng, width, height, scale, ratio)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        areas.append(h * w / (width * height))
        aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    # Rounding w and h to whole pixels moves area and aspect by ~1 % at these sizes.
    assert areas.min() >= scale[0] * 0.97 and areas.max() <= scale[1] + 1e-9
    assert aspects.min() >= ratio[0] * 0.97 and aspects.max() <= ratio[1] * 1.03
    # ... and the draws cover the ranges (not a degenerate crop).
    assert areas.min() < 0.12 and areas.max() > 0.9
    assert aspects.min() < 0.8 and aspects.max() > 1.25
    # Aspect is log-uniform: in a square image as many boxes are wider than tall as taller than
    # wide (binomial, 5 sigma); elsewhere boxes shaped like the image fit more often.
    wide = (aspects > 1).mean()
    if width == height:
        assert abs(wide - 0.5) < 5 * math.sqrt(0.25 / len(aspects))
    else:
        assert (wide > 0.5) == (width > height)


def test_random_resized_crop_falls_back_to_a_clamped_center_crop():
    # A 1000 x 20 strip: no box with aspect <= 4/3 and area >= 8 % fits, so the fallback runs.
    rng = np.random.default_rng(0)
    top, left, h, w = transforms.random_resized_crop_box(rng, 1000, 20, (0.08, 1.0), (3 / 4, 4 / 3))
    assert (h, w) == (20, round(20 * 4 / 3)) and top == 0 and left == (1000 - w) // 2


def test_random_resized_crop_output_is_the_resized_box():
    img = _noise_image(120, 90)
    out = transforms.random_resized_crop(img, np.random.default_rng(5), 32, (0.08, 1.0), (3 / 4, 4 / 3), "bicubic")
    top, left, h, w = transforms.random_resized_crop_box(np.random.default_rng(5), 120, 90, (0.08, 1.0), (3 / 4, 4 / 3))
    expected = img.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
    assert out.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_eval_transform_is_deterministic_resize_then_center_crop():
    cfg = data.default_config()
    img = _noise_image(400, 300)
    ev = transforms.EvalTransform(cfg)
    a, b = ev(img), ev(img)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (224, 224, 3) and a.dtype == np.float32
    # Shorter side 300 -> 256, longer 400 -> int(256 * 400 / 300) = 341; crop offsets (58, 16).
    resized = img.resize((341, 256), Image.Resampling.BICUBIC)
    crop = np.asarray(resized, np.float32)[16:240, 58:282]
    mean, std = np.array(cfg.mean, np.float32), np.array(cfg.std, np.float32)
    np.testing.assert_allclose(a, (crop / 255 - mean) / std, atol=1e-5)


def test_normalize_and_hflip():
    cfg = data.default_config()
    cfg.image_size, cfg.train_crop, cfg.randaugment, cfg.color_jitter, cfg.reprob = 4, "resize", "", 0.0, 0.0
    img = _noise_image(4, 4, seed=2)
    plain = transforms.normalize(img, cfg.mean, cfg.std)
    mean, std = np.array(cfg.mean, np.float32), np.array(cfg.std, np.float32)
    np.testing.assert_allclose(plain, (np.asarray(img, np.float32) / 255 - mean) / std, atol=1e-5)
    t = transforms.TrainTransform(cfg)
    flips = []
    for s in range(1000):
        out = t(img, np.random.default_rng(s))
        flipped = np.array_equal(out, plain[:, ::-1])
        assert flipped or np.array_equal(out, plain)  # the image or its mirror, nothing else
        flips.append(flipped)
    assert abs(np.mean(flips) - 0.5) < 5 * math.sqrt(0.25 / 1000)
    cfg.hflip = False
    t = transforms.TrainTransform(cfg)
    assert all(np.array_equal(t(img, np.random.default_rng(s)), plain) for s in range(50))


def test_pad_random_crop_shifts_by_at_most_the_padding():
    img = _noise_image(16, 16, seed=3)
    ref = np.asarray(img)
    for seed in range(50):
        out = np.asarray(transforms.pad_random_crop(img, np.random.default_rng(seed), 16, 2))
        # Find the shift (dy, dx) that maps the source onto the crop; it must be within +-2.
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if np.array_equal(
                out[max(0, dy) : 16 + min(0, dy), max(0, dx) : 16 + min(0, dx)],
                ref[max(0, -dy) : 16 + min(0, -dy), max(0, -dx) : 16 + min(0, -dx)],
            )
        ]
        assert len(matches) == 1


def test_color_jitter_is_off_while_randaugment_is_on():
    cfg = data.default_config()
    assert transforms.TrainTransform(cfg).color_jitter == 0.0 and cfg.color_jitter == 0.4
    cfg.randaugment = ""
    assert transforms.TrainTransform(cfg).color_jitter == 0.4
