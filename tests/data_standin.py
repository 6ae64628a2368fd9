"""TEMPORARY stand-in for `biformer_jax.data` (digits only) until the data branch lands.

Implements the agreed interface for the 'digits' dataset with no augmentation, so the trainer
can be developed and tested. Delete once `biformer_jax/data` exists.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    image_size: int


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="digits",
            data_dir="",
            folder="",
            train_split="train",
            eval_split="validation",
            image_size=224,
            eval_resize=256,
            crop_pct=0.875,
            interpolation="bicubic",
            hflip=True,
            randaugment="rand-m9-mstd0.5-inc1",
            color_jitter=0.4,
            reprob=0.25,
            remode="pixel",
            recount=1,
            repeated_aug=3,
            scale=(0.08, 1.0),
            ratio=(3 / 4, 4 / 3),
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            cache=False,
        )
    )


def default_mixup_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=0.1)
    )


def _digits(cfg):
    if cfg.name != "digits":
        raise ValueError(f"stand-in data module only knows 'digits', not {cfg.name!r}")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # (N, 8, 8)
    rep = cfg.image_size // 8
    x = np.repeat(np.repeat(x, rep, axis=1), rep, axis=2)[..., None].repeat(3, axis=-1)
    x = (x - 0.5) / 0.5
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    n_train = int(0.8 * len(y))
    return (x[perm[:n_train]], y[perm[:n_train]]), (x[perm[n_train:]], y[perm[n_train:]])


def dataset_info(cfg) -> DatasetInfo:
    (xt, _), (xe, _) = _digits(cfg)
    return DatasetInfo(10, len(xt), len(xe), cfg.image_size)


def train_iterator(cfg, *, seed, start_step, global_batch_size, process_index, process_count):
    (x, y), _ = _digits(cfg)
    b_local = global_batch_size // process_count
    step = start_step
    while True:
        idx = np.random.default_rng([seed, step]).choice(len(y), global_batch_size, replace=False)
        idx = idx[process_index * b_local : (process_index + 1) * b_local]
        yield {"image": x[idx], "label": y[idx]}
        step += 1


def eval_iterator(cfg, *, global_batch_size, process_index, process_count):
    _, (x, y) = _digits(cfg)
    b_local = global_batch_size // process_count
    for start in range(0, len(y), global_batch_size):
        xb, yb = x[start : start + global_batch_size], y[start : start + global_batch_size]
        mask = np.ones(len(yb), np.float32)
        pad = global_batch_size - len(yb)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
            mask = np.concatenate([mask, np.zeros(pad, np.float32)])
        sl = slice(process_index * b_local, (process_index + 1) * b_local)
        yield {"image": xb[sl], "label": yb[sl], "mask": mask[sl]}


def mixup_cutmix(rng, images, labels, *, num_classes, cfg):
    off = cfg.label_smoothing / num_classes
    targets = jax.nn.one_hot(labels, num_classes) * (1.0 - cfg.label_smoothing) + off
    if cfg.mixup_alpha > 0 and cfg.prob > 0:
        lam = jax.random.beta(rng, cfg.mixup_alpha, cfg.mixup_alpha)
        images = lam * images + (1 - lam) * images[::-1]
        targets = lam * targets + (1 - lam) * targets[::-1]
    return images, targets.astype(jnp.float32)
