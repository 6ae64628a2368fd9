"""A miniature ImageNet-2012 manual_dir and the real TFDS `imagenet2012` built from it, offline.

The tars follow the official layout that tfds' imagenet2012 builder reads:
  ILSVRC2012_img_train.tar  holds one inner tar per class, named `<wnid>.tar` after the first
                            WordNet ids of the builder's labels.txt, each with `<wnid>_<k>.JPEG`.
  ILSVRC2012_img_val.tar    holds `ILSVRC2012_val_<8 digits>.JPEG`; tfds takes their labels from
                            its own validation_labels.txt (line n is the label of image n).
Images are small random-noise JPEGs of varied sizes and aspect ratios, so crops and resizes see
non-square inputs. Used by the data tests and the trainer tests (train a step; interrupt/resume).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"


def _jpeg_bytes(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A random RGB JPEG of the given size (a smooth colour ramp plus noise, so it compresses)."""
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    base = rng.uniform(0, 255, size=(1, 1, 3)).astype(np.float32)
    noise = rng.normal(0, 20, size=(height, width, 3)).astype(np.float32)
    pixels = np.clip(0.5 * base + 0.5 * ramp + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def imagenet_wnids() -> list[str]:
    """The 1000 WordNet ids in the order of tfds' imagenet2012 labels (label k = line k)."""
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    return Path(imagenet_common.label_names_file()).read_text().split()


def imagenet_validation_labels(count: int) -> list[str]:
    """WordNet ids of the first `count` official validation images, as tfds labels them."""
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    labels_file = Path(imagenet_common.label_names_file()).with_name("validation_labels.txt")
    return labels_file.read_text().split()[:count]


def write_manual_dir(
    manual_dir: str | Path, *, num_classes: int = 3, per_class: int = 2, num_val: int = 3, seed: int = 0
) -> Path:
    """Writes ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar (official layout) into manual_dir."""
    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (64, 40), (56, 56), (40, 72), (80, 60)]
    with tarfile.open(manual_dir / TRAIN_TAR, "w") as outer:
        for wnid in imagenet_wnids()[:num_classes]:
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for k in range(per_class):
                    h, w = sizes[int(rng.integers(len(sizes)))]
                    _add_bytes(inner, f"{wnid}_{k}.JPEG", _jpeg_bytes(rng, h, w))
            _add_bytes(outer, f"{wnid}.tar", inner_buf.getvalue())
    with tarfile.open(manual_dir / VAL_TAR, "w") as val:
        for n in range(1, num_val + 1):
            h, w = sizes[int(rng.integers(len(sizes)))]
            _add_bytes(val, f"ILSVRC2012_val_{n:08d}.JPEG", _jpeg_bytes(rng, h, w))
    return manual_dir


def build_mini_imagenet(root: str | Path, **manual_kwargs) -> Path:
    """Builds the real TFDS imagenet2012 (array_record files) from a miniature manual_dir.

    Returns the TFDS data_dir (root/tfds) to put in the data config (`cfg.data_dir`). Takes a few
    seconds. `manual_kwargs` go to write_manual_dir (num_classes, per_class, num_val, seed).
    """
    from biformer_jax import data

    root = Path(root)
    manual_dir = write_manual_dir(root / "manual", **manual_kwargs)
    data_dir = root / "tfds"
    cfg = data.default_config()
    cfg.name, cfg.data_dir = "imagenet2012", str(data_dir)
    data.prepare_dataset(cfg, manual_dir=str(manual_dir))
    return data_dir
