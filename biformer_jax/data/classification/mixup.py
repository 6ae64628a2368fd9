"""Mixup / CutMix with label smoothing, as timm's Mixup, in jax.numpy for the jitted train step.

`mixup_cutmix` runs on device inside the train step: one draw per batch ('batch', the official
recipe), per pair of rows i and B-1-i ('pair') or per row ('elem'); row i is mixed with row
B-1-i (timm flips the batch). CutMix pastes a box of the partner image; with correct_lam the
label weight is 1 - the box's area fraction after clipping to the image. Targets are
lam * smooth_one_hot(y) + (1 - lam) * smooth_one_hot(y flipped), so every row sums to 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from biformer_jax.data.config import validate_mixup_config


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """(B,) int -> (B, num_classes) float32: 1 - smoothing + smoothing / K on the label, smoothing / K off."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


_TRIES = 16  # Marsaglia-Tsang candidates per gamma draw
_BETA_UNIFORMS = 2 * (2 * _TRIES + 1)  # per Beta draw: 2 gammas x (normals, acceptance coins, boost)


def _uniforms(rng: jax.Array, count: int, n: int) -> jax.Array:
    """(count, n) uniforms in (0, 1). Every random number of a mixing comes from this one call:
    each jax.random op adds about a second of XLA:CPU compile time to the train step."""
    return jax.random.uniform(rng, (count, n), minval=jnp.finfo(jnp.float32).tiny)


def _beta_from_uniforms(u: jax.Array, alpha: float) -> jax.Array:
    """Beta(alpha, alpha) draws (n,) from uniforms (_BETA_UNIFORMS, n), as X / (X + Y), X, Y ~ Gamma(alpha).

    Gamma by Marsaglia & Tsang (2000) with _TRIES candidates at once, keeping the first
    accepted (each is accepted with p >= 0.95, so all rejected has odds < 1e-20; then the mode
    is used); alpha < 1 via Gamma(alpha + 1) * U ** (1 / alpha). Straight-line jnp, where
    jax.random.beta's rejection loop takes seconds to compile.
    """
    u = u.reshape(2, 2 * _TRIES + 1, -1)  # (X|Y, normals | coins | boost, n)
    shape = alpha + 1.0 if alpha < 1.0 else alpha
    d = shape - 1.0 / 3.0
    c = 1.0 / jnp.sqrt(9.0 * d)
    z = jnp.sqrt(2.0) * jax.scipy.special.erfinv(2.0 * u[:, :_TRIES] - 1.0)  # (2, tries, n) standard normals
    coins = u[:, _TRIES : 2 * _TRIES]  # (2, tries, n)
    v = (1.0 + c * z) ** 3
    log_v = jnp.log(jnp.where(v > 0, v, 1.0))
    accept = (v > 0) & (jnp.log(coins) < 0.5 * z**2 + d - d * v + d * log_v)  # (2, tries, n)
    first = jnp.argmax(accept, axis=1)  # (2, n)
    gamma = d * jnp.take_along_axis(v, first[:, None], axis=1)[:, 0]  # (2, n)
    gamma = jnp.where(accept.any(axis=1), gamma, d)
    if alpha < 1.0:
        gamma = gamma * u[:, 2 * _TRIES] ** (1.0 / alpha)
    return (gamma[0] / (gamma[0] + gamma[1])).astype(jnp.float32)


def sample_beta(rng: jax.Array, alpha: float, n: int) -> jax.Array:
    """n draws of Beta(alpha, alpha): float32 (n,)."""
    return _beta_from_uniforms(_uniforms(rng, _BETA_UNIFORMS, n), alpha)


def mixup_enabled(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or bool(cfg.cutmix_minmax))


def _draws(rng: jax.Array, n: int, height: int, width: int, cfg: ml_collections.ConfigDict):
    """n independent mixing draws: lam (n,) float32, use_cutmix (n,) bool, box (yl, yh, xl, xh) (n,) int32."""
    u = _uniforms(rng, 6 + 2 * _BETA_UNIFORMS, n)
    u_apply, u_switch, u_y, u_x, u_h, u_w = u[:6]
    u_mixup, u_cutmix = u[6 : 6 + _BETA_UNIFORMS], u[6 + _BETA_UNIFORMS :]

    def randint(u, low, high):  # uniform integers in [low, high)
        return jnp.clip(low + jnp.floor(u * (high - low)).astype(jnp.int32), low, high - 1)

    mixup_on = cfg.mixup_alpha > 0
    cutmix_alpha = 1.0 if cfg.cutmix_minmax else cfg.cutmix_alpha  # timm forces 1.0 under minmax
    cutmix_on = cutmix_alpha > 0
    use_cutmix = u_switch < cfg.switch_prob if mixup_on and cutmix_on else jnp.full((n,), cutmix_on)
    lam_mixup = _beta_from_uniforms(u_mixup, cfg.mixup_alpha) if mixup_on else jnp.ones((n,))
    lam_cutmix = _beta_from_uniforms(u_cutmix, cutmix_alpha) if cutmix_on else jnp.ones((n,))
    applied = u_apply < cfg.prob
    lam = jnp.where(applied, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)
    use_cutmix = use_cutmix & applied

    if cfg.cutmix_minmax:
        lo, hi = cfg.cutmix_minmax
        cut_h = randint(u_h, int(height * lo), int(height * hi))
        cut_w = randint(u_w, int(width * lo), int(width * hi))
        yl = randint(u_y, 0, height - cut_h)
        xl = randint(u_x, 0, width - cut_w)
        yh, xh = yl + cut_h, xl + cut_w
    else:
        # A box of side ~ sqrt(1 - lam) centred anywhere in the image, clipped at the borders.
        ratio = jnp.sqrt(1.0 - lam)
        cut_h = jnp.floor(height * ratio).astype(jnp.int32)
        cut_w = jnp.floor(width * ratio).astype(jnp.int32)
        cy, cx = randint(u_y, 0, height), randint(u_x, 0, width)
        yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
        xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    if cfg.correct_lam or cfg.cutmix_minmax:
        box_lam = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (height * width)
        lam = jnp.where(use_cutmix, box_lam, lam)
    return lam, use_cutmix, (yl, yh, xl, xh)


def mixup_cutmix(
    rng: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, jax.Array]:
    """Mixes a batch: images (B, H, W, C) float, labels (B,) int -> (images, targets (B, K) float32).

    Pure jax.numpy (call it inside the jitted step). B must be even, as in timm. With mixing
    off (both alphas 0 and no cutmix_minmax, or prob 0) it returns the images unchanged and
    label-smoothed one-hot targets.
    """
    validate_mixup_config(cfg)
    smoothing = cfg.label_smoothing
    if not mixup_enabled(cfg):
        return images, smooth_one_hot(labels, num_classes, smoothing)
    batch, height, width, _ = images.shape
    if batch % 2:
        raise ValueError(f"mixup_cutmix needs an even batch (rows i and B-1-i are mixed), got B={batch}.")

    n = {"batch": 1, "pair": batch // 2, "elem": batch}[cfg.mode]
    lam, use_cutmix, (yl, yh, xl, xh) = _draws(rng, n, height, width, cfg)
    rows = jnp.arange(batch)
    if cfg.mode == "batch":
        draw = jnp.zeros((batch,), jnp.int32)
    elif cfg.mode == "pair":
        draw = jnp.minimum(rows, batch - 1 - rows)  # rows i and B-1-i share a draw
    else:
        draw = rows
    lam, use_cutmix = lam[draw], use_cutmix[draw]  # (B,)
    yl, yh, xl, xh = yl[draw], yh[draw], xl[draw], xh[draw]  # (B,)

    partner = images[::-1]
    ys = jnp.arange(height)[None, :, None]  # (1, H, 1)
    xs = jnp.arange(width)[None, None, :]  # (1, 1, W)
    in_box = (
        (ys >= yl[:, None, None]) & (ys < yh[:, None, None]) & (xs >= xl[:, None, None]) & (xs < xh[:, None, None])
    )  # (B, H, W)
    paste = (use_cutmix[:, None, None] & in_box)[..., None]  # (B, H, W, 1)
    lam_px = jnp.where(use_cutmix, 1.0, lam).astype(images.dtype)[:, None, None, None]  # (B, 1, 1, 1)
    blended = images * lam_px + partner * (1 - lam_px)
    mixed = jnp.where(paste, partner, blended)

    one_hot = smooth_one_hot(labels, num_classes, smoothing)  # (B, K)
    targets = lam[:, None] * one_hot + (1.0 - lam[:, None]) * one_hot[::-1]
    return mixed, targets
