"""mmcv's iteration schedules and the configs' weight-decay rules, value by value."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from biformer_jax.tasks.segmentation import optim
from configs.seg import sfpn_biformer_s, upernet_biformer_s


def test_sfpn_schedule_is_linear_warmup_from_a_tenth_times_cosine():
    cfg = sfpn_biformer_s.get_config().optim
    lr = optim.lr_schedule(cfg, 80000)
    cosine = lambda i: 2e-4 * 1e-8 + 0.5 * (2e-4 - 2e-4 * 1e-8) * (1 + math.cos(math.pi * i / 80000))  # noqa: E731
    for i in (0, 1, 500, 999):
        # mmcv: regular lr x (1 - (1 - i / warmup) (1 - ratio))
        assert float(lr(i)) == pytest.approx(cosine(i) * (1 - (1 - i / 1000) * 0.9), rel=1e-5)
    for i in (1000, 40000, 79999):
        assert float(lr(i)) == pytest.approx(cosine(i), rel=1e-5, abs=1e-12)
    assert float(lr(80000)) == pytest.approx(2e-12, abs=1e-12)


def test_upernet_schedule_is_poly_after_a_warmup_from_one_millionth():
    cfg = upernet_biformer_s.get_config().optim
    lr = optim.lr_schedule(cfg, 160000)
    assert float(lr(0)) == pytest.approx(6e-5 * 1e-6, rel=1e-4)
    assert float(lr(750)) == pytest.approx(6e-5 * (1 - 750 / 160000) * (1 - 0.5 * (1 - 1e-6)), rel=1e-5)
    assert float(lr(80000)) == pytest.approx(3e-5, rel=1e-5)
    assert float(lr(160000)) == 0.0


def test_decay_rules():
    params = {"backbone": {"stages_0_0": {"norm1": {"scale": jnp.ones(2)}, "attn": {"qkv": {"bias": jnp.ones(2)}}}},
              "decode_head": {"bn": {"scale": jnp.ones(2)}}}  # fmt: skip
    upernet = optim.decay_mask(upernet_biformer_s.get_config().optim.no_decay_keys)(params)
    assert not upernet["backbone"]["stages_0_0"]["norm1"]["scale"]
    assert upernet["backbone"]["stages_0_0"]["attn"]["qkv"]["bias"] and upernet["decode_head"]["bn"]["scale"]
    sfpn = optim.decay_mask(sfpn_biformer_s.get_config().optim.no_decay_keys)(params)
    assert all(jax.tree.leaves(sfpn))  # every parameter decays


def test_unknown_schedule_is_refused():
    cfg = ml_collections.ConfigDict(dict(schedule="step", lr=1.0, warmup_iters=0, warmup_ratio=0.1))
    with pytest.raises(ValueError, match="segmentation schedules are"):
        optim.lr_schedule(cfg, 10)
