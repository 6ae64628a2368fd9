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


def mixup_enabled(cfg: ml_collections.ConfigDict) -> bool:
    return cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or bool(cfg.cutmix_minmax))


def _draws(rng: jax.Array, n: int, height: int, width: int, cfg: ml_collections.ConfigDict):
    """n independent mixing draws: lam (n,) float32, use_cutmix (n,) bool, box (yl, yh, xl, xh) (n,) int32."""
    k_apply, k_switch, k_mix, k_cut, k_y, k_x, k_h, k_w = jax.random.split(rng, 8)
    mixup_on = cfg.mixup_alpha > 0
    cutmix_alpha = 1.0 if cfg.cutmix_minmax else cfg.cutmix_alpha  # timm forces 1.0 under minmax
    cutmix_on = cutmix_alpha > 0
    if mixup_on and cutmix_on:
        use_cutmix = jax.random.uniform(k_switch, (n,)) < cfg.switch_prob
    else:
        use_cutmix = jnp.full((n,), cutmix_on)
    lam_mixup = jax.random.beta(k_mix, cfg.mixup_alpha, cfg.mixup_alpha, (n,)) if mixup_on else jnp.ones((n,))
    lam_cutmix = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha, (n,)) if cutmix_on else jnp.ones((n,))
    applied = jax.random.uniform(k_apply, (n,)) < cfg.prob
    lam = jnp.where(applied, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)
    use_cutmix = use_cutmix & applied

    if cfg.cutmix_minmax:
        lo, hi = cfg.cutmix_minmax
        cut_h = jax.random.randint(k_h, (n,), int(height * lo), int(height * hi))
        cut_w = jax.random.randint(k_w, (n,), int(width * lo), int(width * hi))
        yl = jax.random.randint(k_y, (n,), 0, height - cut_h)
        xl = jax.random.randint(k_x, (n,), 0, width - cut_w)
        yh, xh = yl + cut_h, xl + cut_w
    else:
        # A box of side ~ sqrt(1 - lam) centred anywhere in the image, clipped at the borders.
        ratio = jnp.sqrt(1.0 - lam)
        cut_h = jnp.floor(height * ratio).astype(jnp.int32)
        cut_w = jnp.floor(width * ratio).astype(jnp.int32)
        cy = jax.random.randint(k_y, (n,), 0, height)
        cx = jax.random.randint(k_x, (n,), 0, width)
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
