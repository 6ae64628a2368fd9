"""Grad-CAM and the effective receptive field on models whose answer is known analytically."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from biformer_jax.visualize import saliency


class DepthwiseStack(nn.Module):
    """`layers` depthwise k x k convolutions with all-ones kernels ("same" padding)."""

    layers: int
    k: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            conv = nn.Conv(3, (self.k, self.k), padding="SAME", feature_group_count=3, use_bias=False,
                           kernel_init=nn.initializers.ones, name=f"dw{i}")  # fmt: skip
            x = conv(x)
        return x


class Toy(nn.Module):
    """Stage 0 is a depthwise stack (module `stages_0_0`), then global mean pooling and a Linear head."""

    layers: int = 2
    k: int = 3
    num_classes: int = 4

    @nn.compact
    def __call__(self, x, train=False):
        f = DepthwiseStack(self.layers, self.k, name="stages_0_0")(x)
        return nn.Dense(self.num_classes, name="head")(f.mean(axis=(1, 2)))


def _init(model, size=15):
    return model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))


@pytest.mark.parametrize("layers,k", [(1, 3), (2, 3), (3, 5)])
def test_erf_of_a_depthwise_stack_is_its_stacked_kernel(layers, k):
    model = Toy(layers=layers, k=k)
    size = 31
    variables = _init(model, size)
    images = jax.random.normal(jax.random.key(1), (3, size, size, 3))
    heat = saliency.erf(model, variables, images, stage=0, batch=2)
    # d centre / d x of a stack of ones kernels: the kernel convolved with itself `layers` times,
    # once per colour channel (depthwise), whatever the images (the model is linear).
    profile = np.ones(1)
    for _ in range(layers):
        profile = np.convolve(profile, np.ones(k))
    expected = np.zeros((size, size))
    r = (len(profile) - 1) // 2
    c = size // 2
    expected[c - r : c + r + 1, c - r : c + r + 1] = 3 * np.outer(profile, profile)
    np.testing.assert_allclose(heat, expected, rtol=1e-5, atol=1e-5)
    support = np.argwhere(heat > 0)
    assert support.min(0).tolist() == [c - r, c - r] and support.max(0).tolist() == [c + r, c + r]
    assert len(support) == (layers * (k - 1) + 1) ** 2


def test_mass_fractions_count_the_fewest_pixels():
    heat = np.zeros((15, 15))
    heat[6:9, 6:9] = 1.0  # 9 equal pixels of 225
    fractions = saliency.mass_fractions(heat)
    assert fractions == {0.2: 2 / 225, 0.5: 5 / 225, 0.9: 9 / 225}
    peaked = np.zeros((10, 10))
    peaked[0, 0], peaked[0, 1:5] = 6.0, 1.0  # 60% in one pixel of 100
    assert saliency.mass_fractions(peaked, levels=(0.5, 0.6, 0.7)) == {0.5: 0.01, 0.6: 0.01, 0.7: 0.02}
    with pytest.raises(ValueError, match="no mass"):
        saliency.mass_fractions(np.zeros((4, 4)))


def test_grad_cam_of_a_linear_model_is_relu_of_the_class_weights():
    # Stage 0 is the identity (one 1x1 ones depthwise conv), the head W: the gradient of logit c
    # wrt A[h, w] is W[:, c] / (h w), so Grad-CAM = relu(x . W[:, c]), scaled to a peak of 1.
    model = Toy(layers=1, k=1, num_classes=4)
    variables = jax.tree_util.tree_map(lambda a: a, _init(model, 8))
    w = np.array([[1.0, -1.0, 0.5, 0.0], [-2.0, 1.0, 0.5, 0.0], [0.5, 0.0, -1.0, 1.0]], np.float32)
    params = dict(variables["params"])
    params["head"] = {"kernel": jnp.asarray(w), "bias": jnp.array([0.0, 0.0, 0.0, 10.0])}  # class 3 predicted
    variables = {"params": params}
    x = jax.random.normal(jax.random.key(2), (1, 8, 8, 3))
    for cls in (0, 1, 2, None):
        cam, got, logits = saliency.grad_cam(model, variables, x, stage=0, class_index=cls)
        want = 3 if cls is None else cls
        assert got == want
        expected = np.maximum(np.asarray(x[0]) @ w[:, want], 0.0)
        np.testing.assert_allclose(cam, expected / expected.max(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logits, np.asarray(x[0]).mean((0, 1)) @ w + [0, 0, 0, 10], rtol=1e-5)
    with pytest.raises(ValueError, match="class 7 does not exist: the model has 4 classes"):
        saliency.grad_cam(model, variables, x, stage=0, class_index=7)
    with pytest.raises(ValueError, match="Stage 2 does not exist"):
        saliency.grad_cam(model, variables, x, stage=2)


def test_grad_cam_refuses_a_backbone():
    class Backbone(nn.Module):
        features_only: bool = True

        @nn.compact
        def __call__(self, x, train=False):
            return [DepthwiseStack(1, 3, name="stages_0_0")(x)]

    model = Backbone()
    with pytest.raises(ValueError, match="no classifier"):
        saliency.grad_cam(model, _init(model, 8), jnp.zeros((1, 8, 8, 3)), stage=0)
