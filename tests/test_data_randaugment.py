"""RandAugment: every op keeps dtype, size and range; ops do what their names say; policy parsing."""

import numpy as np
import pytest
from PIL import Image

from biformer_jax.data.classification import randaugment
from biformer_jax.data.classification.randaugment import RandAugment, apply_op


def _image(seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("name", sorted(randaugment.OPS))
@pytest.mark.parametrize("magnitude", [0.0, 5.0, 9.0, 10.0])
def test_every_op_keeps_mode_size_dtype_and_range(name, magnitude):
    img = _image()
    out = apply_op(name, img, magnitude, np.random.default_rng(1), fill=(124, 116, 104))
    assert out.mode == "RGB" and out.size == img.size
    arr = np.asarray(out)
    assert arr.dtype == np.uint8 and arr.shape == (30, 40, 3)
    assert 0 <= arr.min() and arr.max() <= 255


def test_point_ops_do_what_they_say():
    img = _image(2)
    x = np.asarray(img).astype(np.int32)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(np.asarray(apply_op("Invert", img, 9, rng)), 255 - x)
    # SolarizeIncreasing at m9: threshold 256 - int(0.9 * 256) = 26; pixels >= 26 are inverted.
    out = np.asarray(apply_op("SolarizeIncreasing", img, 9, rng)).astype(np.int32)
    np.testing.assert_array_equal(out, np.where(x >= 26, 255 - x, x))
    # PosterizeIncreasing at m9: keeps 4 - int(3.6) = 1 bit; at m10 none (black).
    np.testing.assert_array_equal(np.asarray(apply_op("PosterizeIncreasing", img, 9, rng)), x & 0x80)
    assert np.asarray(apply_op("PosterizeIncreasing", img, 10, rng)).max() == 0
    np.testing.assert_array_equal(np.asarray(apply_op("PosterizeIncreasing", img, 0, rng)), x & 0xF0)
    # SolarizeAdd at m9: + int(0.9 * 110) = 99 below 128, clipped at 255.
    out = np.asarray(apply_op("SolarizeAdd", img, 9, rng)).astype(np.int32)
    np.testing.assert_array_equal(out, np.where(x < 128, np.minimum(x + 99, 255), x))


def test_increasing_ops_are_identity_at_magnitude_zero():
    img = _image(3)
    for name in (
        "ColorIncreasing",
        "ContrastIncreasing",
        "BrightnessIncreasing",
        "SharpnessIncreasing",
        "ShearX",
        "ShearY",
        "TranslateXRel",
        "TranslateYRel",
        "Rotate",
    ):
        out = apply_op(name, img, 0.0, np.random.default_rng(0))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img), err_msg=name)


def test_translate_moves_by_the_magnitude_and_fills_with_the_mean():
    img = _image(4, size=(100, 20))
    fill = (124, 116, 104)
    for seed in range(6):  # both directions occur
        out = np.asarray(apply_op("TranslateXRel", img, 10.0, np.random.default_rng(seed), fill=fill))
        # 45 % of 100 px: 45 columns of fill on one side, the image shifted by 45 on the other.
        left_filled = (out[:, :45] == fill).all()
        right_filled = (out[:, -45:] == fill).all()
        assert left_filled != right_filled
        src = np.asarray(img)
        if left_filled:
            np.testing.assert_array_equal(out[:, 45:], src[:, :55])
        else:
            np.testing.assert_array_equal(out[:, :55], src[:, 45:])


def test_policy_string_is_read_as_timm_reads_it():
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    assert ra.ops == randaugment.RAND_INCREASING_OPS and len(ra.ops) == 15
    assert (ra.magnitude, ra.num_ops, ra.prob, ra.magnitude_std, ra.magnitude_max) == (9.0, 2, 0.5, 0.5, 10.0)
    ra = RandAugment.from_string("rand-m7-n3-p0.8-mstd101")
    assert ra.ops == randaugment.RAND_OPS and (ra.magnitude, ra.num_ops, ra.prob) == (7.0, 3, 0.8)
    assert ra.magnitude_std == float("inf")
    for bad in ("v0", "rand-m9-x3", "augmix-m5"):
        with pytest.raises(ValueError, match="randaugment"):
            RandAugment.from_string(bad)


def test_magnitude_noise_is_clipped_to_the_range():
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    rng = np.random.default_rng(0)
    m = np.array([ra.sample_magnitude(rng) for _ in range(4000)])
    assert m.min() >= 0 and m.max() == 10.0  # N(9, 0.5) crosses 10 about 2 % of the time
    assert abs(m.mean() - 9.0) < 0.05 and 0.4 < m.std() < 0.5


def test_randaugment_applies_about_one_op_per_image():
    # 2 ops, each applied with p 0.5: P(image unchanged) >= 1/4 (an applied op can also be a no-op).
    ra = RandAugment.from_string("rand-m9-mstd0.5-inc1")
    img = _image(5)
    changed = [not np.array_equal(np.asarray(ra(img, np.random.default_rng(s))), np.asarray(img)) for s in range(400)]
    assert 0.55 < np.mean(changed) < 0.78
