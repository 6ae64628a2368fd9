"""Random erasing touches the stated fraction of images and of their area, in the stated modes."""

import math

import numpy as np

from biformer_jax.data.classification import erasing


def _spec_area_fractions(rng, n, height, width, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """Area fractions of boxes drawn as the spec says (vectorised; not the implementation's code)."""
    out = np.full(n, np.nan)
    todo = np.arange(n)
    for _ in range(10):
        area = rng.uniform(min_area, max_area, len(todo)) * height * width
        aspect = np.exp(rng.uniform(math.log(min_aspect), -math.log(min_aspect), len(todo)))
        h, w = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
        fits = (h < height) & (w < width)
        out[todo[fits]] = h[fits] * w[fits] / (height * width)
        todo = todo[~fits]
    return out[~np.isnan(out)]


def test_erasing_rate_and_area_match_the_spec():
    rng = np.random.default_rng(0)
    height = width = 48
    draws = 4000
    zeros = np.zeros((height, width, 3), np.float32)
    erased = []
    for _ in range(draws):
        out = erasing.random_erasing(zeros, rng, prob=0.25, mode="pixel")
        erased.append((out != 0).any(axis=-1).mean())
    erased = np.array(erased)
    touched = erased > 0
    # Images erased: Binomial(4000, 0.25) (minus rare no-fit draws), 5 sigma.
    assert abs(touched.mean() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / draws)
    # Erased area per erased image: within [2 %, 1/3] and distributed as the spec says.
    assert erased[touched].min() >= 0.02 * 0.9 and erased[touched].max() <= 1 / 3 * 1.1
    spec = _spec_area_fractions(np.random.default_rng(1), 20000, height, width)
    assert abs(erased[touched].mean() - spec.mean()) < 5 * spec.std() / math.sqrt(touched.sum())
    assert abs(np.median(erased[touched]) - np.median(spec)) < 0.03


def test_pixel_mode_fills_with_unit_normal_noise_other_modes_as_named():
    rng = np.random.default_rng(0)
    img = np.full((64, 64, 3), 7.0, np.float32)
    values = []
    for _ in range(200):
        out = erasing.random_erasing(img, rng, prob=1.0, mode="pixel")
        values.append(out[out != 7.0])
    noise = np.concatenate(values)
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1.0) < 0.01
    out = erasing.random_erasing(img, np.random.default_rng(1), prob=1.0, mode="const")
    assert set(np.unique(out)) == {0.0, 7.0}
    out = erasing.random_erasing(img, np.random.default_rng(1), prob=1.0, mode="rand")
    box = out[(out != 7.0).any(-1)]  # (pixels, 3): one colour for the whole box
    assert len(box) > 0 and (box == box[0]).all()
    assert img.min() == img.max() == 7.0  # the input is not modified


def test_count_splits_the_area_over_several_boxes():
    rng = np.random.default_rng(0)
    one = [len(erasing.erase_boxes(rng, 64, 64, max_count=1)) for _ in range(200)]
    many = [len(erasing.erase_boxes(rng, 64, 64, min_count=3, max_count=3)) for _ in range(200)]
    assert set(one) == {1} and set(many) == {3}
