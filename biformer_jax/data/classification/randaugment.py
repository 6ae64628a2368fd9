"""RandAugment with timm's semantics, on PIL images, driven by an explicit numpy Generator.

A policy string such as 'rand-m9-mstd0.5-inc1' reads as in timm's rand_augment_transform:
  m<int>    magnitude on a 0..10 scale (default 10)
  n<int>    ops per image, drawn with replacement (default 2)
  p<float>  probability of applying each drawn op (default 0.5)
  mstd<f>   std of Gaussian noise added to the magnitude per application (> 100: uniform in
            [0, m]); the noisy magnitude is clipped to [0, mmax]
  mmax<int> magnitude upper bound (default 10)
  inc<int>  1 = the 'increasing' op set, whose severity grows with magnitude for every op
The magnitude maps to op arguments as in timm: rotate up to 30 degrees, shear up to 0.3,
translate up to 45% of the side, enhance factors 1 -/+ 0.9 * m / 10 (increasing set) or
0.1 + 1.8 * m / 10, posterize / solarize thresholds scaled from 4 bits / 256. Geometric ops fill
with the dataset mean colour and resample with the configured interpolation.
(One deliberate difference: timm reads 'inc0' as on, since bool('0') is True; here it is off.)
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_LEVEL_DENOM = 10.0
_TRANSLATE_PCT = 0.45

# The plain set and the increasing-severity set (same order as timm's lists).
RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def _signed(value: float, rng: np.random.Generator) -> float:
    # Geometric and 'increasing' enhance ops go either way with equal probability.
    return -value if rng.random() > 0.5 else value


# --- magnitude (0..10) -> op argument -----------------------------------------------------


def _rotate_arg(m, rng):
    return _signed(m / _LEVEL_DENOM * 30.0, rng)


def _shear_arg(m, rng):
    return _signed(m / _LEVEL_DENOM * 0.3, rng)


def _translate_arg(m, rng):
    return _signed(m / _LEVEL_DENOM * _TRANSLATE_PCT, rng)


def _enhance_arg(m, rng):
    return m / _LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_arg(m, rng):
    return max(0.1, 1.0 + _signed(m / _LEVEL_DENOM * 0.9, rng))


def _posterize_arg(m, rng):
    return int(m / _LEVEL_DENOM * 4)  # bits kept: fewer bits (more severe) at low magnitude


def _posterize_increasing_arg(m, rng):
    return 4 - _posterize_arg(m, rng)


def _solarize_arg(m, rng):
    return min(256, int(m / _LEVEL_DENOM * 256))  # threshold: lower = more pixels inverted


def _solarize_increasing_arg(m, rng):
    return 256 - _solarize_arg(m, rng)


def _solarize_add_arg(m, rng):
    return min(128, int(m / _LEVEL_DENOM * 110))


# --- ops: (PIL RGB image, argument, fill, resample) -> PIL RGB image of the same size --------


def _affine(img, matrix, fill, resample):
    # PIL's affine maps output (x, y) to input (a x + b y + c, d x + e y + f).
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _shear_x(img, factor, fill, resample):
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def _shear_y(img, factor, fill, resample):
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def _translate_x(img, pct, fill, resample):
    return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample)


def _translate_y(img, pct, fill, resample):
    return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample)


def _posterize(img, bits, fill, resample):
    # Keep the `bits` high bits. A lookup table, because PIL >= 10 rejects bits = 0, which the
    # increasing op reaches at magnitude 10 (timm's PIL 9 made such images black).
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize_add(img, add, fill, resample):
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhance(enhancer_name: str) -> Callable:
    enhancer = getattr(ImageEnhance, enhancer_name)
    return lambda img, factor, fill, resample: enhancer(img).enhance(factor)


OPS: dict[str, tuple[Callable, Callable | None]] = {
    "AutoContrast": (lambda img, a, fill, rs: ImageOps.autocontrast(img), None),
    "Equalize": (lambda img, a, fill, rs: ImageOps.equalize(img), None),
    "Invert": (lambda img, a, fill, rs: ImageOps.invert(img), None),
    "Rotate": (lambda img, deg, fill, rs: img.rotate(deg, resample=rs, fillcolor=fill), _rotate_arg),
    "Posterize": (_posterize, _posterize_arg),
    "PosterizeIncreasing": (_posterize, _posterize_increasing_arg),
    "Solarize": (lambda img, t, fill, rs: ImageOps.solarize(img, t), _solarize_arg),
    "SolarizeIncreasing": (lambda img, t, fill, rs: ImageOps.solarize(img, t), _solarize_increasing_arg),
    "SolarizeAdd": (_solarize_add, _solarize_add_arg),
    "Color": (_enhance("Color"), _enhance_arg),
    "ColorIncreasing": (_enhance("Color"), _enhance_increasing_arg),
    "Contrast": (_enhance("Contrast"), _enhance_arg),
    "ContrastIncreasing": (_enhance("Contrast"), _enhance_increasing_arg),
    "Brightness": (_enhance("Brightness"), _enhance_arg),
    "BrightnessIncreasing": (_enhance("Brightness"), _enhance_increasing_arg),
    "Sharpness": (_enhance("Sharpness"), _enhance_arg),
    "SharpnessIncreasing": (_enhance("Sharpness"), _enhance_increasing_arg),
    "ShearX": (_shear_x, _shear_arg),
    "ShearY": (_shear_y, _shear_arg),
    "TranslateXRel": (_translate_x, _translate_arg),
    "TranslateYRel": (_translate_y, _translate_arg),
}


def apply_op(
    name: str,
    img: Image.Image,
    magnitude: float,
    rng: np.random.Generator,
    *,
    fill: tuple[int, int, int] = (128, 128, 128),
    interpolation: str = "bicubic",
) -> Image.Image:
    """Applies one named op at a magnitude (0..10) to a PIL RGB image; same mode and size out."""
    op, to_arg = OPS[name]
    arg = to_arg(magnitude, rng) if to_arg is not None else None
    return op(img, arg, fill, Image.Resampling[interpolation.upper()])


class RandAugment:
    """Draws `num_ops` ops (with replacement) per image; each applies with probability `prob`."""

    def __init__(
        self,
        ops: tuple[str, ...],
        *,
        magnitude: float = 10.0,
        num_ops: int = 2,
        prob: float = 0.5,
        magnitude_std: float = 0.0,
        magnitude_max: float = _LEVEL_DENOM,
        fill: tuple[int, int, int] = (128, 128, 128),
        interpolation: str = "bicubic",
    ):
        unknown = [op for op in ops if op not in OPS]
        if unknown:
            raise ValueError(f"RandAugment: unknown op(s) {unknown}; known: {sorted(OPS)}.")
        self.ops, self.magnitude, self.num_ops, self.prob = tuple(ops), magnitude, num_ops, prob
        self.magnitude_std, self.magnitude_max = magnitude_std, magnitude_max
        self.fill, self.interpolation = tuple(fill), interpolation

    @classmethod
    def from_string(cls, policy: str, **kwargs) -> RandAugment:
        """Parses a timm policy string ('rand-m9-mstd0.5-inc1'); kwargs: fill, interpolation."""
        parts = policy.split("-")
        if parts[0] != "rand":
            raise ValueError(
                f"randaugment {policy!r}: only timm RandAugment strings ('rand-m9-mstd0.5-inc1') are "
                "supported; use '' to turn it off."
            )
        opts = dict(magnitude=_LEVEL_DENOM, num_ops=2, prob=0.5, magnitude_std=0.0, magnitude_max=_LEVEL_DENOM)
        increasing = False
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
            if match is None:
                raise ValueError(
                    f"randaugment {policy!r}: cannot read section {part!r}; sections are m<int>, n<int>, "
                    "p<float>, mstd<float>, mmax<int>, inc<0|1>."
                )
            key, val = match.groups()
            if key == "mstd":
                opts["magnitude_std"] = float("inf") if float(val) > 100 else float(val)
            elif key == "mmax":
                opts["magnitude_max"] = float(val)
            elif key == "inc":
                increasing = bool(int(float(val)))
            elif key == "m":
                opts["magnitude"] = float(int(float(val)))
            elif key == "n":
                opts["num_ops"] = int(float(val))
            else:
                opts["prob"] = float(val)
        return cls(RAND_INCREASING_OPS if increasing else RAND_OPS, **opts, **kwargs)

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        magnitude = self.magnitude
        if self.magnitude_std == float("inf"):
            magnitude = rng.uniform(0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        return float(min(max(magnitude, 0.0), self.magnitude_max))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for k in rng.integers(0, len(self.ops), size=self.num_ops):
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            magnitude = self.sample_magnitude(rng)
            img = apply_op(self.ops[k], img, magnitude, rng, fill=self.fill, interpolation=self.interpolation)
        return img
