"""Helpers for the segmentation tests: a stand-in model and a miniature ADE20K folder."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from PIL import Image


class StandInSeg(nn.Module):
    """Any (N, H, W, 3) -> (N, H/4, W/4, K) segmentation model: a patchify conv, BatchNorm, 1x1 head."""

    num_classes: int = 5
    width: int = 16
    auxiliary_head: bool = False  # as the real models: an extra head whose logits return_aux adds

    @nn.compact
    def __call__(self, x, train: bool = False, return_aux: bool = False):
        x = nn.Conv(self.width, (4, 4), strides=(4, 4), padding="VALID")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(nn.Conv(self.width, (3, 3))(nn.relu(x)))
        logits = nn.Conv(self.num_classes, (1, 1))(x).astype(jnp.float32)
        if self.auxiliary_head and (return_aux or self.is_initializing()):
            aux = nn.Conv(self.num_classes, (1, 1), name="aux")(x).astype(jnp.float32)
            return (logits, aux) if return_aux else logits
        return logits


def write_mini_ade(root: Path, sizes: dict[str, list[tuple[int, int]]], num_classes: int = 150, seed: int = 0) -> Path:
    """ADEChallengeData2016 layout with generated JPEGs and label PNGs (ids 0..num_classes, 0 = other).

    `sizes`: split -> list of (h, w). Labels are blocks of a few classes so crops see several.
    """
    rng = np.random.default_rng(seed)
    for split, shapes in sizes.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(shapes):
            ids = rng.choice(np.arange(0, num_classes + 1), size=4, replace=False)
            label = np.zeros((h, w), np.uint8)
            label[: h // 2, : w // 2], label[: h // 2, w // 2 :] = ids[0], ids[1]
            label[h // 2 :, : w // 2], label[h // 2 :, w // 2 :] = ids[2], ids[3]
            image = (rng.uniform(0, 255, (h, w, 3)) * 0.3 + label[..., None] * 1.0).astype(np.uint8)
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(label, "L").save(root / "annotations" / split / f"{name}.png")
    return root
