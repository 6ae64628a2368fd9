"""What a checkpoint records about its input: the eval preprocessing and the class names.

train.py stores `data_record(config.data)` in every checkpoint's meta as "data", so predict.py
and the exporter (biformer_jax.tasks.classification.inference) can read any image without the run's config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from biformer_jax.data import config as data_config

IMAGENET_DATASET = "imagenet2012"


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The eval transform of one checkpoint (see the module docstring); JSON-serialisable."""

    image_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_data_config(cls, cfg) -> Preprocess:
        return cls(
            image_size=int(cfg.image_size),
            resize=int(cfg.eval_resize),
            interpolation=str(cfg.interpolation),
            mean=tuple(float(v) for v in cfg.mean),
            std=tuple(float(v) for v in cfg.std),
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Preprocess:
        return cls(
            image_size=int(record["image_size"]),
            resize=int(record["resize"]),
            interpolation=str(record["interpolation"]),
            mean=tuple(float(v) for v in record["mean"]),
            std=tuple(float(v) for v in record["std"]),
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }


IMAGENET_PREPROCESS = Preprocess(224, 256, "bicubic", data_config.IMAGENET_MEAN, data_config.IMAGENET_STD)


def imagenet_class_names() -> list[str]:
    """The 1000 WordNet ids of TFDS's imagenet2012 `labels.txt`, in label order (tench = 0)."""
    import importlib.util
    from pathlib import Path

    # Read from the installed package without importing it (tensorflow_datasets imports TensorFlow).
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ImageNet class names come from tensorflow_datasets, which is not installed.")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "imagenet2012" / "labels.txt"
    text = path.read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != 1000:
        raise RuntimeError(f"TFDS's imagenet2012 labels.txt has {len(names)} lines, not 1000.")
    return names


def class_names_of(cfg) -> list[str] | None:
    """The class names of a data config's dataset, or None when they cannot be found here.

    digits: "0".."9"; folder: the train split's class folder names; imagenet2012: TFDS's
    WordNet ids; another TFDS dataset: its label feature's names (needs its prepared metadata).
    """
    from biformer_jax.data import sources

    name = str(cfg.name)
    if name == "digits":
        return [str(i) for i in range(10)]
    if name == "folder":
        try:
            return list(sources.scan_folder(cfg.folder, cfg.train_split)[0])
        except (OSError, ValueError):
            return None
    if name.split(":")[0] == IMAGENET_DATASET:
        return imagenet_class_names()
    try:
        builder = sources._prepared_tfds(name, cfg.data_dir or None)
        names = builder.info.features[sources._tfds_keys(builder)[1]].names
    except Exception:  # noqa: BLE001 - an unprepared or unusual dataset: names are optional
        return None
    return list(names) if names else None


def data_record(cfg) -> dict[str, Any]:
    """What a checkpoint records about its input (train.py stores it in the meta as "data")."""
    return {"name": str(cfg.name), **Preprocess.from_data_config(cfg).to_record(), "class_names": class_names_of(cfg)}
