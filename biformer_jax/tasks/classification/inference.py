"""A checkpoint made ready for inference: its model, weights, input preprocessing and class names.

    loaded = inference.load("workdirs/quickstart")          # any checkpoint this project loads
    x = np.stack([inference.preprocess(read_image(p), loaded.preprocess) for p in paths])
    logits = loaded.model.apply(loaded.variables, x, train=False)  # (N, num_classes) float32

`predict.py` and `python -m biformer_jax.export` both start here. The preprocessing is the
eval transform the model was evaluated with (data.transforms.EvalTransform): resize the
shorter side to `resize` (PIL, `interpolation`), center-crop `image_size` x `image_size`,
scale to [0, 1] and normalise with `mean` / `std`, NHWC float32. Where it comes from, in order:
the checkpoint's own record (train.py writes `data` into every checkpoint's meta), a config
passed by the caller, and for 1000-class checkpoints without either (converted official
weights) the ImageNet eval transform (bicubic 256 -> 224, ImageNet mean/std) with the
WordNet ids of TFDS's imagenet2012 `labels.txt` as class names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from biformer_jax.data.classification import transforms
from biformer_jax.data.record import IMAGENET_PREPROCESS, Preprocess, class_names_of, imagenet_class_names
from biformer_jax.models.detection import DETECTION_VARIANTS
from biformer_jax.models.segmentation import SEGMENTATION_VARIANTS
from biformer_jax.tasks.classification.task import ClassificationTask
from biformer_jax.training import checkpoint, loader

TASK = ClassificationTask()  # what predict.py and export apply: TASK.predict_batch
SEGMENTATION_INSTEAD = "predict with `python -m biformer_jax.segmentation.predict --config=configs/seg/...`"
DETECTION_INSTEAD = "predict with `python predict.py --checkpoint=... [--draw=DIR] IMAGES`"

# Model options that change how, not what, the model computes; an inference caller may override them.
IMPL_OPTIONS = ("attn_impl", "dwconv_impl")


class InferenceInputError(ValueError):
    """A checkpoint, image or option that cannot be used; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A checkpoint ready for inference; `variables` are host numpy arrays."""

    model: Any
    variables: dict[str, Any]
    meta: dict[str, Any]
    preprocess: Preprocess
    class_names: list[str]
    checkpoint: str
    preprocess_source: str  # where the preprocessing came from, for the user
    task: Any = TASK  # the checkpoint's task: its predict_batch is the forward pass

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _model_meta(path: str) -> tuple[checkpoint.CheckpointRef, dict[str, Any]]:
    p = checkpoint.as_path(path)  # gs://, s3:// or local
    if not p.exists():
        raise InferenceInputError(f"--checkpoint {path}: no such file or directory.")
    if (p / "variables").is_dir() and not (p / checkpoint.META_FILE).exists():
        if not (p / "meta").is_dir():
            raise InferenceInputError(
                f"{path} holds weights (variables/) but no model record: a converter checkpoint names its "
                f"model in {checkpoint.META_FILE}, a train.py step in meta/. Re-create it with "
                "`python -m biformer_jax.convert --model=NAME ...`, or write "
                f'{checkpoint.META_FILE} = {{"format": "{checkpoint.VARIABLES_FORMAT}", "model": NAME, '
                '"model_kwargs": {...}} beside variables/.'
            )
    try:
        ref = checkpoint.resolve(p)
        meta = checkpoint.load_meta(ref)
    except (FileNotFoundError, ValueError) as e:
        raise InferenceInputError(str(e)) from None
    if not meta.get("model"):
        raise InferenceInputError(
            f"The checkpoint {ref.path} has no model record (its meta names no 'model'): add "
            f'"model": <create_model name> and "model_kwargs" to it, as `python -m biformer_jax.convert` writes.'
        )
    return ref, meta


def checkpoint_record(path: str) -> tuple[checkpoint.CheckpointRef, dict[str, Any]]:
    """(ref, record) of the checkpoint at `path`; InferenceInputError saying what is wrong where it has none."""
    return _model_meta(path)


def _num_classes(meta: Mapping[str, Any]) -> int:
    return int(meta.get("model_kwargs", {}).get("num_classes", 1000))


def _input_of(meta: Mapping[str, Any], config, num_classes: int, path: str) -> tuple[Preprocess, list | None, str]:
    record = meta.get("data")
    if config is not None:
        return Preprocess.from_data_config(config.data), class_names_of(config.data), "the config's data"
    if record:
        return Preprocess.from_record(record), record.get("class_names"), "the checkpoint's data record"
    if num_classes == 1000:
        return IMAGENET_PREPROCESS, imagenet_class_names(), "ImageNet defaults (the checkpoint records no data)"
    raise InferenceInputError(
        f"The checkpoint {path} does not record its input preprocessing (it predates the data record, or was "
        f"converted with num_classes={num_classes}): pass --config=configs/<experiment>.py, the config it "
        "was trained with."
    )


def load(
    path: str,
    *,
    config=None,
    ema: bool = False,
    model_overrides: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> Loaded:
    """Model, weights, preprocessing and class names of any checkpoint this project loads.

    `config` (an experiment config) supplies the preprocessing and class names when given;
    `model_overrides` may change only IMPL_OPTIONS; `class_names` replaces the names found.
    Raises InferenceInputError for anything the caller can fix.
    """
    ref, meta = _model_meta(path)
    if meta.get("model") in SEGMENTATION_VARIANTS:  # tasks.for_record's test, without the registry above us
        raise InferenceInputError(
            f"{ref.path}: the checkpoint is a segmentation model ({meta['model']!r}), and this takes "
            f"classification checkpoints; {SEGMENTATION_INSTEAD}."
        )
    if meta.get("model") in DETECTION_VARIANTS:
        raise InferenceInputError(
            f"{ref.path}: the checkpoint is a detection model ({meta['model']!r}), and this takes "
            f"classification checkpoints; {DETECTION_INSTEAD}."
        )
    overrides = dict(model_overrides or {})
    bad = sorted(set(overrides) - set(IMPL_OPTIONS))
    if bad:
        raise InferenceInputError(f"model_overrides {bad}: only {IMPL_OPTIONS} may change for inference.")
    try:
        model = loader.build(ref, meta, overrides)
    except loader.RecordError as e:
        raise InferenceInputError(str(e)) from None
    num_classes = _num_classes(meta)
    preprocess, names, source = _input_of(meta, config, num_classes, str(ref.path))
    if class_names is not None:
        names = list(class_names)
    if names is None:
        names = [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise InferenceInputError(
            f"{len(names)} class names for a model with {num_classes} classes ({ref.path}); "
            "pass a label list with one name per class."
        )
    try:
        loaded = loader.load(
            ref, input_size=preprocess.image_size, model=model, ema="only" if ema else "no", on_host=True
        )
    except FileNotFoundError as e:
        raise InferenceInputError(str(e)) from None
    return Loaded(
        model=model,
        variables=loaded.variables,
        meta=dict(meta),
        preprocess=preprocess,
        class_names=names,
        checkpoint=str(ref.path),
        preprocess_source=source,
        task=TASK,
    )


def read_image(path: str) -> Image.Image:
    """The RGB image in `path`; InferenceInputError naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")  # gray, palette, RGBA and CMYK become RGB, as in training
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InferenceInputError(f"cannot read image {path}: {e}") from None


def preprocess(img: Image.Image, spec: Preprocess) -> np.ndarray:
    """PIL RGB image of any size -> float32 (image_size, image_size, 3), the eval transform."""
    img = transforms.center_crop(transforms.resize_shorter(img, spec.resize, spec.interpolation), spec.image_size)
    return transforms.normalize(img, spec.mean, spec.std)
