"""Grad-CAM and the effective receptive field on models whose answer is known analytically.

The answers vary over space (issue 25, item 9): the ERF of kernels with mixed signs (dropping
the abs() changes it), and the Grad-CAM of a model whose class gradient differs at every
location of a downsampled stage (dropping the spatial mean or the bilinear upsampling changes it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from biformer_jax.visualize import saliency


class DepthwiseStack(nn.Module):
    """`layers` depthwise k x k convolutions ("same" padding), all-ones kernels unless set in params."""

    layers: int
    k: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            conv = nn.Conv(3, (self.k, self.k), padding="SAME", feature_group_count=3, use_bias=False,
                           kernel_init=nn.initializers.ones, name=f"dw{i}")  # fmt: skip
            x = conv(x)
        return x


def _full_conv2d(a, b):
    """The full 2-D convolution of a (p, p) and b (q, q): (p + q - 1, p + q - 1)."""
    out = np.zeros((a.shape[0] + b.shape[0] - 1, a.shape[1] + b.shape[1] - 1))
    for i, j in np.ndindex(*b.shape):
        out[i : i + a.shape[0], j : j + a.shape[1]] += b[i, j] * a
    return out


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


def test_erf_of_mixed_sign_kernels_is_the_absolute_stacked_kernel():
    """Kernels with positive and negative taps, another per channel: the ERF is |stacked kernel|
    summed over the colour channels. Without the abs() the signs cancel and the map differs."""
    layers, k, size = 2, 3, 21
    model = Toy(layers=layers, k=k)
    variables = _init(model, size)
    kernels = np.random.default_rng(3).standard_normal((layers, k, k, 1, 3)).astype(np.float32)  # mixed signs
    params = dict(variables["params"])
    params["stages_0_0"] = {f"dw{i}": {"kernel": jnp.asarray(kernels[i])} for i in range(layers)}
    variables = {"params": params}
    heat = saliency.erf(model, variables, jax.random.normal(jax.random.key(1), (2, size, size, 3)), stage=0)
    # flax's Conv is a cross-correlation: d out[c] / d x[c + d] = (K_1 * K_2)[d + r] (* the full
    # 2-D convolution), r the stacked radius, per colour channel.
    r, c = layers * (k - 1) // 2, size // 2
    expected = np.zeros((size, size))
    for ch in range(3):
        stacked = _full_conv2d(kernels[0, :, :, 0, ch], kernels[1, :, :, 0, ch])  # (5, 5)
        expected[c - r : c + r + 1, c - r : c + r + 1] += np.abs(stacked)
    np.testing.assert_allclose(heat, expected, rtol=1e-5, atol=1e-5)


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


class PooledStage(nn.Module):
    """2 x 2 average pooling (stride 2) as a depthwise conv: the stage output is at half resolution."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(3, (2, 2), strides=(2, 2), padding="VALID", feature_group_count=3, use_bias=False,
                       kernel_init=nn.initializers.constant(0.25), name="pool")(x)  # fmt: skip


class SpatialLinear(nn.Module):
    """logit[k] = sum_{h, w, c} S[h, w] V[c, k] A[h, w, c]: d logit[k] / d A[h, w, c] = S[h, w] V[c, k]."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        a = PooledStage(name="stages_0_0")(x)  # (B, h, w, 3)
        spatial = self.param("spatial", nn.initializers.ones, a.shape[1:3])  # (h, w)
        channel = self.param("channel", nn.initializers.ones, (3, self.num_classes))  # (3, K)
        return jnp.einsum("bhwc,hw,ck->bk", a, spatial, channel)


def _bilinear_upsample(a, size):
    """Half-pixel-centre bilinear upsampling of a (h, w) map, edges clamped (what an image resize does)."""

    def weights(n_in, n_out):  # (n_out, n_in) interpolation matrix
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), lo] += 1 - (src - lo)
        m[np.arange(n_out), hi] += src - lo
        return m

    return weights(a.shape[0], size[0]) @ a @ weights(a.shape[1], size[1]).T


def test_grad_cam_averages_spatially_varying_gradients_and_upsamples_bilinearly():
    """The class gradient S[h, w] V[:, k] differs at every location of a half-resolution stage:
    alpha = mean(S) V[:, k], so Grad-CAM = relu(A . V[:, k]) (mean(S) > 0), bilinearly upsampled
    to the input, peak 1. Per-location weights (no spatial mean) would give relu(S (A . V[:, k]))
    and S changes sign; nearest or no upsampling gives another map at 16 x 16."""
    model = SpatialLinear()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    spatial = np.linspace(-1.0, 2.0, 64).reshape(8, 8).T  # mean 0.5, negative in the first columns
    channel = np.array([[1.0, -0.5, 0.2], [-1.0, 1.0, 0.3], [0.5, 0.5, -1.0]], np.float32)
    variables = {"params": {**variables["params"], "spatial": jnp.asarray(spatial), "channel": jnp.asarray(channel)}}
    x = jax.random.normal(jax.random.key(2), (1, 16, 16, 3))
    acts = np.asarray(x[0]).reshape(8, 2, 8, 2, 3).mean((1, 3))  # (8, 8, 3): the pooled stage output
    for cls in range(3):
        cam, got, _ = saliency.grad_cam(model, variables, x, stage=0, class_index=cls)
        low = np.maximum(acts @ channel[:, cls] * spatial.mean(), 0.0)  # (8, 8)
        expected = _bilinear_upsample(low, (16, 16))
        assert got == cls and cam.shape == (16, 16)
        np.testing.assert_allclose(cam, expected / expected.max(), rtol=1e-5, atol=1e-6)


def test_grad_cam_refuses_a_backbone():
    class Backbone(nn.Module):
        features_only: bool = True

        @nn.compact
        def __call__(self, x, train=False):
            return [DepthwiseStack(1, 3, name="stages_0_0")(x)]

    model = Backbone()
    with pytest.raises(ValueError, match="no classifier"):
        saliency.grad_cam(model, _init(model, 8), jnp.zeros((1, 8, 8, 3)), stage=0)
