"""Whole / slide / multi-scale + flip inference against references computed apart (numpy + PyTorch)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from support.segmentation import StandInSeg

from biformer_jax.data.segmentation import config as seg_config
from biformer_jax.tasks.segmentation import inference


class KnownSeg(nn.Module):
    """No weights: logits_k = mean of channel 0 over each 4x4 patch x (k - 1) + column / 10 x k."""

    num_classes: int = 3

    def __call__(self, x, train=False, return_aux=False):
        n, h, w, _ = x.shape
        pooled = x[..., 0].reshape(n, h // 4, 4, w // 4, 4).mean((2, 4))  # (N, h/4, w/4)
        col = jnp.arange(w // 4, dtype=jnp.float32)[None, None, :] / 10.0
        logits = jnp.stack([pooled * (k - 1) + col * k for k in range(self.num_classes)], -1)
        return (logits, None) if return_aux else logits


def known_reference(image: np.ndarray, flip: bool, label_hw, k: int = 3) -> np.ndarray:
    """KnownSeg's view in numpy + PyTorch: logits at the label size (K, H, W), flipped back."""
    x = image[:, ::-1] if flip else image
    h, w = x.shape[:2]
    pooled = x[..., 0].reshape(h // 4, 4, w // 4, 4).mean((1, 3))
    col = np.arange(w // 4, dtype=np.float32)[None, :] / 10.0
    logits = torch.tensor(np.stack([pooled * (c - 1) + col * c for c in range(k)])[None], dtype=torch.float32)
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    logits = F.interpolate(logits, size=label_hw, mode="bilinear", align_corners=False)[0]
    return np.ascontiguousarray(logits.numpy()[:, :, ::-1]) if flip else logits.numpy()


def eval_cfg(**kw):
    cfg = seg_config.default_eval_config()
    cfg.update(kw)
    return cfg


def test_multi_scale_flip_averages_softmax_at_the_label_size():
    rng = np.random.default_rng(0)
    label_hw = (37, 45)
    views = [
        (0.5, False, rng.normal(size=(16, 24, 3)).astype(np.float32)),
        (0.5, True, rng.normal(size=(16, 24, 3)).astype(np.float32)),
        (1.0, False, rng.normal(size=(32, 40, 3)).astype(np.float32)),
        (1.0, True, rng.normal(size=(32, 40, 3)).astype(np.float32)),
    ]
    segmenter = inference.Segmenter(KnownSeg(), {}, eval_cfg())
    probs = [torch.softmax(torch.tensor(known_reference(im, f, label_hw)), 0).numpy() for _, f, im in views]
    expected = np.mean(probs, 0).argmax(0)
    pred = segmenter.predict(views, label_hw)
    assert pred.shape == label_hw
    np.testing.assert_array_equal(pred, expected)
    # The flipped views matter: the unflipped views alone give another answer.
    assert not np.array_equal(expected, np.mean([probs[0], probs[2]], 0).argmax(0))
    scores = np.asarray(segmenter.scores(views, label_hw))[: label_hw[0], : label_hw[1]]
    np.testing.assert_allclose(scores, np.sum(probs, 0).transpose(1, 2, 0), atol=1e-5)


def test_single_view_keeps_the_logits():
    image = np.random.default_rng(1).normal(size=(32, 64, 3)).astype(np.float32)
    segmenter = inference.Segmenter(KnownSeg(), {}, eval_cfg())
    scores = np.asarray(segmenter.scores([(1.0, True, image)], (50, 70)))[:50, :70]
    np.testing.assert_allclose(scores, known_reference(image, True, (50, 70)).transpose(1, 2, 0), atol=1e-5)


def test_slide_equals_whole_when_one_window_covers_the_image():
    model = StandInSeg(num_classes=4)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    image = np.random.default_rng(2).normal(size=(40, 56, 3)).astype(np.float32)
    whole = inference.Segmenter(model, variables, eval_cfg(mode="whole"))
    slide = inference.Segmenter(model, variables, eval_cfg(mode="slide", crop_size=(64, 64), stride=(48, 48)))
    a = np.asarray(whole.scores([(1.0, False, image)], (40, 56)))
    b = np.asarray(slide.scores([(1.0, False, image)], (40, 56)))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_slide_averages_overlapping_windows():
    image = np.random.default_rng(3).normal(size=(32, 48, 3)).astype(np.float32)
    cfg = eval_cfg(mode="slide", crop_size=(32, 32), stride=(16, 16))
    out = np.asarray(
        inference.view_logits(
            {}, jnp.asarray(image)[None], model=KnownSeg(), mode="slide", crop=(32, 32), stride=(16, 16), flip=False
        )
    )
    boxes = inference.slide_windows(32, 48, cfg.crop_size, cfg.stride)
    assert boxes == [(0, 32, 0, 32), (0, 32, 16, 48)]
    total, count = np.zeros((3, 32, 48)), np.zeros((32, 48))
    for y1, y2, x1, x2 in boxes:
        total[:, y1:y2, x1:x2] += known_reference(image[y1:y2, x1:x2], False, (y2 - y1, x2 - x1))
        count[y1:y2, x1:x2] += 1
    np.testing.assert_allclose(out[0], (total / count).transpose(1, 2, 0), atol=1e-5)
