"""mmsegmentation's train and test transforms on numpy arrays (image uint8 RGB, label uint8 ids).

The official configs run mmcv's OpenCV resizes: images bilinear (half-pixel centres, no
antialiasing when shrinking), labels nearest (source pixel floor(dst * src / dst)). Both are
written here in numpy (float arithmetic, rounded; OpenCV's fixed-point result differs by at most
1 grey level), so the pipeline needs no OpenCV. Randomness comes from an explicit Generator.

Train, in the configs' order: Resize(img_scale, ratio_range, keep_ratio) -> RandomCrop(crop,
cat_max_ratio) -> RandomFlip(prob) -> PhotoMetricDistortion -> Normalize -> Pad(crop, image 0,
label 255). Test: Resize to img_scale x ratio keeping the aspect, then AlignResize (resize to
multiples of size_divisor) -> Normalize.
"""

from __future__ import annotations

import math

import numpy as np

IGNORE = 255


# --- resizes -----------------------------------------------------------------------------


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w1) per output index: half-pixel centres, clamped at the borders (OpenCV / PyTorch)."""
    pos = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    pos = np.clip(pos, 0.0, None)
    i0 = np.minimum(np.floor(pos).astype(np.int64), src - 1)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, (pos - i0).astype(np.float32)


def resize_bilinear(img: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (H, W, C) uint8 to (h, w), no antialiasing (cv2.INTER_LINEAR)."""
    h, w = size_hw
    if img.shape[:2] == (h, w):
        return img
    y0, y1, wy = _linear_taps(img.shape[0], h)
    x0, x1, wx = _linear_taps(img.shape[1], w)
    f = img.astype(np.float32)
    rows = f[y0] * (1 - wy)[:, None, None] + f[y1] * wy[:, None, None]  # (h, W, C)
    out = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]  # (h, w, C)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def resize_nearest(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest resize of a (H, W) label map (cv2.INTER_NEAREST: source floor(i * H / h))."""
    h, w = size_hw
    if label.shape[:2] == (h, w):
        return label
    ys = np.minimum(np.floor(np.arange(h) * (label.shape[0] / h)).astype(np.int64), label.shape[0] - 1)
    xs = np.minimum(np.floor(np.arange(w) * (label.shape[1] / w)).astype(np.int64), label.shape[1] - 1)
    return label[ys[:, None], xs[None, :]]


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.imrescale's output (h, w): the largest size within scale's (long, short) edges, aspect kept."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def align_size(height: int, width: int, divisor: int) -> tuple[int, int]:
    """AlignResize's target: each side rounded up to a multiple of divisor (0 = unchanged)."""
    if divisor <= 0:
        return height, width
    return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor


def test_size(height: int, width: int, scale: tuple[int, int], ratio: float, divisor: int) -> tuple[int, int]:
    """The network input size of a (height, width) image at test scale `scale` x `ratio`."""
    ratio_scale = (int(scale[0] * ratio), int(scale[1] * ratio))
    return align_size(*rescale_size(height, width, ratio_scale), divisor)


# --- train steps -------------------------------------------------------------------------


def random_rescale(img, label, rng: np.random.Generator, scale, ratio_range):
    """Resize(img_scale=scale, ratio_range): scale x uniform(ratio_range), then rescale keeping the aspect."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = rescale_size(img.shape[0], img.shape[1], target)
    return resize_bilinear(img, size), resize_nearest(label, size)


def crop_box(rng: np.random.Generator, height: int, width: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """mmseg's RandomCrop box (y1, y2, x1, x2): uniform offset; the crop is the image where smaller."""
    off_h = int(rng.integers(0, max(height - crop[0], 0) + 1))
    off_w = int(rng.integers(0, max(width - crop[1], 0) + 1))
    return off_h, off_h + crop[0], off_w, off_w + crop[1]


def random_crop(img, label, rng: np.random.Generator, crop, cat_max_ratio: float, ignore_index: int = IGNORE):
    """RandomCrop: with cat_max_ratio < 1, re-draw (up to 10 times) while one class covers >= that share.

    As mmseg: a crop passes when it holds at least two non-ignored classes and the largest has
    less than cat_max_ratio of the non-ignored pixels; after 10 failures the 11th box is kept.
    """
    box = crop_box(rng, img.shape[0], img.shape[1], crop)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y1, y2, x1, x2 = box
            ids, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
            counts = counts[ids != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = crop_box(rng, img.shape[0], img.shape[1], crop)
    y1, y2, x1, x2 = box
    return img[y1:y2, x1:x2], label[y1:y2, x1:x2]


def _rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit RGB -> HSV: H in [0, 180), S and V in [0, 255], as float32."""
    f = img.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    v = f.max(-1)
    diff = v - f.min(-1)
    s = np.where(v > 0, diff * 255.0 / np.maximum(v, 1e-6), 0.0)
    safe = np.maximum(diff, 1e-6)
    h = np.where(
        v == r, 60.0 * (g - b) / safe, np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe)
    )
    h = np.where(diff == 0, 0.0, h)
    h = np.where(h < 0, h + 360.0, h)
    return np.stack([np.floor(h / 2 + 0.5) % 180, np.floor(s + 0.5), v], -1).astype(np.float32)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV -> RGB (H in [0, 180)), rounded to uint8."""
    h = hsv[..., 0] * 2.0 / 60.0
    s, v = hsv[..., 1] / 255.0, hsv[..., 2]
    i = np.floor(h).astype(np.int64) % 6
    frac = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, np.float32)
    for k, (r, g, b) in enumerate(choices):
        m = i == k
        out[m] = np.stack([r[m], g[m], b[m]], -1)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)  # truncates, as mmseg


def photometric_distortion(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's PhotoMetricDistortion (default ranges), each step with probability 0.5.

    brightness +-32; contrast x [0.5, 1.5] first (mode 1) or last (mode 0); saturation x
    [0.5, 1.5] and hue +- [-18, 18) in OpenCV's 8-bit HSV. The draws follow mmseg's order.
    """
    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(0.5, 1.5))
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        img = _hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = _rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-18, 18)) % 180
        img = _hsv_to_rgb(hsv)
    if mode == 0 and rng.integers(2):
        img = _convert(img, alpha=rng.uniform(0.5, 1.5))
    return img


def normalize(img: np.ndarray, mean, std) -> np.ndarray:
    """(img / 255 - mean) / std as float32 (mmseg's (img - 255 mean) / (255 std))."""
    mean = np.asarray(mean, np.float32) * 255.0
    std = np.asarray(std, np.float32) * 255.0
    return (img.astype(np.float32) - mean) / std


def pad_to(img: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int = IGNORE):
    """Pad bottom/right to `size` (h, w): image with 0 (after Normalize), label with ignore_index."""
    h, w = size
    ph, pw = max(h - img.shape[0], 0), max(w - img.shape[1], 0)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
    return img, label


class SegTrainTransform:
    """(image uint8, label uint8, rng) -> (float32 (crop_h, crop_w, 3), uint8 (crop_h, crop_w))."""

    def __init__(self, cfg):
        self.scale, self.ratio_range = tuple(cfg.scale), tuple(cfg.ratio_range)
        self.crop, self.cat_max_ratio = tuple(cfg.crop_size), float(cfg.cat_max_ratio)
        self.flip_prob, self.photometric = float(cfg.flip_prob), bool(cfg.photometric)
        self.mean, self.std, self.ignore = tuple(cfg.mean), tuple(cfg.std), int(cfg.ignore_index)

    def __call__(self, img: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        img, label = random_rescale(img, label, rng, self.scale, self.ratio_range)
        img, label = random_crop(img, label, rng, self.crop, self.cat_max_ratio, self.ignore)
        if rng.random() < self.flip_prob:
            img, label = img[:, ::-1], label[:, ::-1]
        if self.photometric:
            img = photometric_distortion(img, rng)
        return pad_to(normalize(img, self.mean, self.std), label, self.crop, self.ignore)


def test_view(img: np.ndarray, scale, ratio: float, divisor: int, mean, std) -> np.ndarray:
    """The normalised network input of one test scale: float32 (h, w, 3)."""
    size = test_size(img.shape[0], img.shape[1], scale, ratio, divisor)
    ratio_scale = (int(scale[0] * ratio), int(scale[1] * ratio))
    # Two resizes, as AlignResize does them: imrescale, then imresize to the aligned size.
    resized = resize_bilinear(img, rescale_size(img.shape[0], img.shape[1], ratio_scale))
    return normalize(resize_bilinear(resized, size), mean, std)
