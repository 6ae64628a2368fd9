"""What the visualisations read: checkpoints (any the project loads), images, stage/block names.

A checkpoint is a train.py workdir or step directory, or a converter output (`checkpoint.resolve`);
its recorded model is rebuilt with `auto_pad=True`, which changes nothing at sizes the regions
divide and lets any input size through. `sklearn:china.jpg` / `sklearn:flower.jpg` name the
photographs that ship with scikit-learn, `sklearn:digit:K` its K-th handwritten digit at 32x32 (the
quickstart's data), so examples need no download.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from biformer_jax import models, tasks
from biformer_jax.training import checkpoint, loader

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class Loaded:
    """A model ready to apply: `model.apply(variables, x)`; `label` names it in figures."""

    model: Any
    variables: dict[str, Any]
    name: str  # create_model name
    label: str


def load_checkpoint(path: str, *, expect_model: str | None = None, ema: bool = False) -> Loaded:
    """The model a checkpoint records, with its weights; clear errors for anything else.

    A detection checkpoint gives its backbone (`_detector_backbone`): what `routes` reads.
    `expect_model`: the create_model name the caller expects; a checkpoint of another model is
    refused with both names. Arrays that do not fit the recorded model raise
    `checkpoint.CheckpointMismatchError` listing them.
    """
    ref = checkpoint.resolve(path)  # FileNotFoundError saying what a checkpoint looks like
    record = checkpoint.load_meta(ref)
    name = record.get("model")
    if name not in models.list_models():
        raise ValueError(f"{path} records model {name!r}, which this project does not define.")
    if tasks.for_record(record).name == "detection":
        return _detector_backbone(ref, path, name, record, ema)
    tasks.require(
        record, "classification", where=str(path), instead="visualize a classifier's checkpoint (or a detector's)"
    )
    if expect_model is not None and name != expect_model:
        raise ValueError(
            f"{path} is a checkpoint of {name!r}, not of {expect_model!r}; drop --model (the checkpoint "
            "names its model) or pass a checkpoint of that model."
        )
    model = build_model(name, record.get("model_kwargs", {}))
    loaded = loader.load(ref, input_size=64, model=model, ema="only" if ema else "no")
    step = f" step {ref.step}" if ref.step is not None else ""
    return Loaded(loaded.model, loaded.variables, name, f"{os.path.basename(os.path.normpath(path))}{step} ({name})")


def _detector_backbone(ref, path: str, name: str, record: dict[str, Any], ema: bool) -> Loaded:
    """A detection checkpoint's backbone (RetinaNet's or Mask R-CNN's) with its weights: the routed
    attention the detector runs, as a module of its own (auto_pad on, blocks unrolled)."""
    from biformer_jax.models.segmentation.backbone import BACKBONES  # noqa: PLC0415  (detectors only)

    detector = models.create_model(name, **record.get("model_kwargs", {}))
    loaded = loader.load(ref, input_size=64, model=detector, ema="only" if ema else "no")
    kwargs = {k: v for k, v in detector.backbone_config.items() if k not in ("drop_path_rate", "drop_rate")}
    backbone = BACKBONES[detector.backbone](**{**kwargs, "auto_pad": True, "scan_blocks": False})
    variables = {c: loaded.variables[c]["backbone"] for c in ("params", "batch_stats") if c in loaded.variables}
    step = f" step {ref.step}" if ref.step is not None else ""
    label = f"{os.path.basename(os.path.normpath(path))}{step} ({name} backbone)"
    return Loaded(backbone, variables, name, label)


def build_model(name: str, kwargs: dict[str, Any] | None = None) -> Any:
    """create_model(name, **kwargs) with auto_pad on (any input size), without dropout."""
    kwargs = {k: v for k, v in dict(kwargs or {}).items() if k not in ("drop_path_rate", "drop_rate")}
    return models.create_model(name, **{**kwargs, "auto_pad": True})


def random_model(name: str, seed: int = 0) -> Loaded:
    """A freshly initialised registered model (e.g. to compare an ERF before training)."""
    model = build_model(name)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 64, 64, 3), jnp.float32))
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    return Loaded(model, variables, name, f"{name} (random init)")


# ---------------------------------------------------------------------------------------
# Images


def read_image(spec: str, size: Sequence[int] | None = None) -> np.ndarray:
    """uint8 RGB (H, W, 3) of a file or an `sklearn:` sample, resized (bicubic) to `size` (H, W)."""
    if spec.startswith("sklearn:"):
        img = _sklearn_image(spec.removeprefix("sklearn:"))
    else:
        try:
            with Image.open(spec) as f:
                img = f.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"No image at {spec}.") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(
                f"Cannot read {spec} as an image ({e}); give a JPEG, PNG, BMP, TIFF or WebP file, or "
                "sklearn:china.jpg / sklearn:flower.jpg / sklearn:digit:K."
            ) from None
    if size is not None:
        img = img.resize((int(size[1]), int(size[0])), Image.BICUBIC)
    return np.asarray(img, np.uint8)


def _sklearn_image(name: str) -> Image.Image:
    import sklearn.datasets

    m = re.fullmatch(r"digit:(\d+)", name)
    if m:
        digits = sklearn.datasets.load_digits().images
        k = int(m.group(1))
        if k >= len(digits):
            raise ValueError(f"sklearn:digit:{k}: there are {len(digits)} digits (0..{len(digits) - 1}).")
        gray = np.round(digits[k] * (255.0 / 16.0)).astype(np.uint8)  # as data.sources.load_digits
        # Upsampled to the quickstart's 32x32 as the data pipeline does (bicubic); --size may resize again.
        return Image.fromarray(gray, "L").resize((32, 32), Image.BICUBIC).convert("RGB")
    try:
        return Image.fromarray(sklearn.datasets.load_sample_image(name))
    except (AttributeError, ValueError, OSError):
        raise ValueError(
            f"sklearn:{name} is not a scikit-learn sample; use sklearn:china.jpg, sklearn:flower.jpg "
            "or sklearn:digit:K."
        ) from None


def folder_images(folder: str, num: int) -> list[str]:
    """The first `num` image files under `folder` (sorted, recursive)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder of images.")
    paths = sorted(
        os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if f.lower().endswith(IMAGE_SUFFIXES)
    )
    if not paths:
        raise FileNotFoundError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    return paths[:num]


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8 (..., H, W, 3) -> float32 (pixel / 255 - mean) / std, as the data pipeline does."""
    x = np.asarray(images, np.float32) / 255.0
    return jnp.asarray((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32))


# ---------------------------------------------------------------------------------------
# Stages and blocks (module names follow the official state_dict: block j of stage i is stages_i_j)


def stage_blocks(variables: dict[str, Any]) -> dict[int, list[str]]:
    """{stage: [block module names in order]} read from the parameter tree."""
    out: dict[int, list[tuple[int, str]]] = {}
    for key in variables["params"]:
        m = re.fullmatch(r"stages_(\d+)_(\d+)", key)
        if m:
            out.setdefault(int(m.group(1)), []).append((int(m.group(2)), key))
    return {s: [k for _, k in sorted(v)] for s, v in sorted(out.items())}


def block_name(variables: dict[str, Any], stage: int, block: int = -1) -> str:
    """The module name of block `block` (negative: from the end) of stage `stage`, or a clear error."""
    blocks = stage_blocks(variables)
    if stage not in blocks:
        raise ValueError(f"Stage {stage} does not exist: this model has stages {sorted(blocks)} (--stage).")
    names = blocks[stage]
    if not -len(names) <= block < len(names):
        raise ValueError(
            f"Stage {stage} has {len(names)} blocks, so block {block} does not exist; use "
            f"0..{len(names) - 1} or -1..-{len(names)} (--block)."
        )
    return names[block]
