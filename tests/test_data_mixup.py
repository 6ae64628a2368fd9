"""Mixup / CutMix on device: label mass, pasted area vs label weight, blending, modes, switches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biformer_jax import data

B, K, S = 16, 20, 12
SMOOTH = 0.1
ON, OFF = 1 - SMOOTH + SMOOTH / K, SMOOTH / K


def _constant_rows():
    """Row i is the constant image i + 1 with label i: what got pasted or blended is readable."""
    images = jnp.broadcast_to(jnp.arange(1, B + 1, dtype=jnp.float32)[:, None, None, None], (B, S, S, 3))
    return images, jnp.arange(B, dtype=jnp.int32)


def _mixes(cfg, seeds):
    """(images, mixed, targets) for each seed, from one compiled function."""
    images, labels = _constant_rows()
    fn = jax.jit(functools.partial(data.mixup_cutmix, num_classes=K, cfg=cfg))
    outs = [fn(jax.random.key(s), images, labels) for s in seeds]
    return [(np.asarray(images), np.asarray(m), np.asarray(t)) for m, t in outs]


def _own_weight(targets):
    """lam of every row, read off its own label's target (labels are distinct here)."""
    return (targets[np.arange(B), np.arange(B)] - OFF) / (ON - OFF)


def _assert_label_mass(targets):
    """Rows sum to 1; above the smoothing floor, mass sits on the own and the partner's label only."""
    assert targets.dtype == np.float32 and targets.shape == (B, K)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
    assert targets.min() >= OFF - 1e-7 and targets.max() <= ON + 1e-6
    own, partner = np.arange(B), np.arange(B)[::-1]
    extra = targets - OFF
    extra[own, own] = 0
    extra[own, partner] = 0
    np.testing.assert_allclose(extra, 0, atol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_cutmix_label_weight_matches_the_pasted_area(mode):
    cfg = data.default_mixup_config()
    cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mode = 0.0, 1.0, mode
    for images, mixed, targets in _mixes(cfg, range(8)):
        _assert_label_mass(targets)
        partner_value = images[::-1, 0, 0, 0]
        pasted = (mixed == partner_value[:, None, None, None]).all(-1).mean(axis=(1, 2))  # (B,)
        kept = (mixed == images).all(-1).mean(axis=(1, 2))
        np.testing.assert_allclose(pasted + kept, 1.0)  # pixels are one image's or the other's
        np.testing.assert_allclose(1.0 - _own_weight(targets), pasted, atol=1e-5)
        # The partner's label weighs exactly the pasted area too.
        np.testing.assert_allclose((targets[np.arange(B), np.arange(B)[::-1]] - OFF) / (ON - OFF), pasted, atol=1e-5)
        if mode == "batch":
            assert np.ptp(pasted) == 0  # one box for the whole batch
        if mode == "pair":
            np.testing.assert_allclose(pasted, pasted[::-1])  # rows i and B-1-i swap the same box


def test_mixup_blends_with_the_target_weight():
    cfg = data.default_mixup_config()
    cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mode = 0.8, 0.0, "elem"
    [(images, mixed, targets)] = _mixes(cfg, [0])
    _assert_label_mass(targets)
    lam = _own_weight(targets)
    expected = lam * images[:, 0, 0, 0] + (1 - lam) * images[::-1, 0, 0, 0]
    np.testing.assert_allclose(mixed[:, 0, 0, 0], expected, rtol=1e-5)
    assert np.ptp(mixed, axis=(1, 2, 3)).max() < 1e-5  # blended uniformly
    assert len(np.unique(np.round(lam, 6))) > B // 2  # per-element draws


def test_switch_prob_and_prob_choose_how_often():
    cfg = data.default_mixup_config()  # batch mode, switch 0.5, prob 1.0
    # CutMix leaves some pixels exactly as they were; mixup changes all (lam < 1 almost surely).
    mixes = _mixes(cfg, range(400))
    for _, _, targets in mixes[:20]:
        _assert_label_mass(targets)
    cut = np.array([(m[0] == i[0]).all(-1).any() for i, m, _ in mixes])
    assert abs(cut.mean() - 0.5) < 5 * np.sqrt(0.25 / 400)
    cfg.prob, cfg.mode = 0.3, "elem"
    mixes = _mixes(cfg, range(50))
    for _, _, targets in mixes[:20]:
        _assert_label_mass(targets)
    untouched = [(m == i).all(axis=(1, 2, 3)) for i, m, _ in mixes]
    assert abs(np.mean(untouched) - 0.7) < 5 * np.sqrt(0.21 / (50 * B))


def test_disabled_mixup_returns_images_and_smoothed_one_hot():
    cfg = data.default_mixup_config()
    cfg.mixup_alpha = cfg.cutmix_alpha = 0.0
    [(images, mixed, targets)] = _mixes(cfg, [0])
    np.testing.assert_array_equal(mixed, images)
    expected = np.full((B, K), OFF, np.float32)
    expected[np.arange(B), np.arange(B)] = ON
    np.testing.assert_allclose(targets, expected, atol=1e-7)


def test_beta_sampler_matches_the_beta_distribution():
    from scipy import stats

    from biformer_jax.data.classification.mixup import sample_beta

    for alpha in (0.8, 1.0):  # the recipe's; 0.8 < 1 also runs the boost branch
        x = np.asarray(jax.jit(lambda k, a=alpha: sample_beta(k, a, 20000))(jax.random.key(1)))
        assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
        assert stats.kstest(x, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_bfloat16_images_and_odd_batch():
    cfg = data.default_mixup_config()
    images, labels = _constant_rows()
    fn = jax.jit(functools.partial(data.mixup_cutmix, num_classes=K, cfg=cfg))
    mixed, targets = fn(jax.random.key(0), images.astype(jnp.bfloat16), labels)
    assert mixed.dtype == jnp.bfloat16 and targets.dtype == jnp.float32
    with pytest.raises(ValueError, match="even batch"):
        data.mixup_cutmix(jax.random.key(0), images[:3], labels[:3], num_classes=K, cfg=cfg)
    cfg.mode = "rows"
    with pytest.raises(ValueError, match="mode"):
        data.mixup_cutmix(jax.random.key(0), images, labels, num_classes=K, cfg=cfg)
