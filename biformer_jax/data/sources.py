"""Random-access example sources: TFDS (ArrayRecord), an ImageFolder tree, embedded digits.

Every source maps a record index to (PIL RGB image, int label) and pickles cheaply, so grain
worker processes can open it themselves. Random access is what makes exact resumption cheap:
the pipeline computes which records a step needs and reads only those (no skipping through
a stream). A missing dataset raises DatasetNotPreparedError saying how to prepare it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from biformer_jax.data.config import DATASET_KINDS, validate_config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class DatasetNotPreparedError(FileNotFoundError):
    """The dataset is not where the config points; the message says how to prepare it."""


class BadImageError(ValueError):
    """An image file of the dataset cannot be decoded; the message names it."""


class NoRandomAccessError(DatasetNotPreparedError):
    """A TFDS dataset is prepared, but in a format without random access (tfrecord)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    image_size: int  # side of the square images the pipeline yields


def _decode(encoded: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(encoded))
    return img.convert("RGB")  # gray, CMYK, palette and RGBA all become RGB (torchvision's loader)


# --- sources -----------------------------------------------------------------------------


class ArraySource:
    """In-memory uint8 images (N, H, W, 3) and int labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: Sequence[int]) -> list[tuple[Image.Image, int]]:
        return [(Image.fromarray(self.images[i], "RGB"), int(self.labels[i])) for i in indices]


class ArrayPairSource:
    """In-memory inputs and targets read as they are: e.g. images (N, H, W, 3) uint8, label maps (N, H, W) uint8."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.images[int(i)], self.labels[int(i)]) for i in indices]


class FileSource:
    """Image files on disk (any PIL format) with their labels.

    A file that cannot be decoded raises BadImageError naming it (`bad_images="error"`), or is
    logged and replaced by the next readable file of the split, label included ("skip").
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, cache: bool = False, bad_images: str = "error"):
        self.paths, self.labels, self.cache, self.bad_images = list(paths), labels, cache, bad_images
        self._cache: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def _bytes(self, i: int) -> bytes:
        if i in self._cache:
            return self._cache[i]
        data = Path(self.paths[i]).read_bytes()
        if self.cache:
            self._cache[i] = data
        return data

    def _decoded(self, i: int) -> Image.Image:
        try:
            return _decode(self._bytes(i))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL: UnidentifiedImageError, truncated
            raise BadImageError(
                f"Cannot decode the image file {self.paths[i]} ({type(e).__name__}: {e}). Remove or replace it, "
                "or set data.bad_images='skip' to train without it."
            ) from e

    def _read_one(self, i: int) -> tuple[Image.Image, int]:
        for offset in range(len(self)):
            j = (i + offset) % len(self)
            try:
                return self._decoded(j), int(self.labels[j])
            except BadImageError as e:
                if self.bad_images != "skip":
                    raise
                logging.getLogger(__name__).warning("%s Skipped: using the next file instead.", e)
        raise BadImageError(f"None of the {len(self)} image files can be decoded (first: {self.paths[0]}).")

    def read(self, indices: Sequence[int]) -> list[tuple[Image.Image, int]]:
        return [self._read_one(i) for i in indices]

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}


class TfdsSource:
    """A prepared TFDS split in a random-access format (ArrayRecord), images decoded by PIL.

    The tfds data source opens lazily in each process (it is not sent to workers).
    """

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str, label_key: str, cache: bool):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key, self.cache = image_key, label_key, cache
        self._ds = None
        self._cache: dict[int, tuple[bytes, int]] = {}
        self._len = len(self._source())

    def _source(self):
        if self._ds is None:
            import tensorflow_datasets as tfds

            self._ds = tfds.data_source(
                self.name,
                split=self.split,
                data_dir=self.data_dir,
                download=False,
                # Keep the encoded bytes: PIL decodes them, as in the official torchvision pipeline.
                decoders={self.image_key: tfds.decode.SkipDecoding()},
            )
        return self._ds

    def __len__(self) -> int:
        return self._len

    def read(self, indices: Sequence[int]) -> list[tuple[Image.Image, int]]:
        missing = [i for i in indices if i not in self._cache]
        records = dict(zip(missing, self._source().__getitems__(missing))) if missing else {}
        out = []
        for i in indices:
            if i in self._cache:
                encoded, label = self._cache[i]
            else:
                encoded, label = records[i][self.image_key], int(records[i][self.label_key])
                if self.cache:
                    self._cache[i] = (encoded, label)
            out.append((_decode(encoded), label))
        return out

    def __getstate__(self):
        return {**self.__dict__, "_ds": None, "_cache": {}}


# --- digits ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def load_digits(size: int, eval_fraction: float, split_seed: int) -> dict[str, ArraySource]:
    """scikit-learn's 1797 handwritten digits: {'train', 'test'} ArraySources of (size, size, 3) uint8.

    The 8x8 images (ink 0..16) are scaled to 0..255, upsampled bicubically to `size` and
    replicated to RGB. The split is stratified: in every class a fixed (split_seed) random
    `eval_fraction` of the images is held out.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    small = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int32)
    bicubic = Image.Resampling.BICUBIC
    big = np.stack([np.asarray(Image.fromarray(im, "L").resize((size, size), bicubic)) for im in small])
    images = np.repeat(big[..., None], 3, axis=-1)  # (N, size, size, 3)

    rng = np.random.Generator(np.random.PCG64(split_seed))
    held_out = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        # Order by random raw bits (stable across numpy versions, unlike Generator.permutation).
        order = members[np.argsort(rng.bit_generator.random_raw(len(members)), kind="stable")]
        held_out[order[: int(round(eval_fraction * len(members)))]] = True
    return {
        "train": ArraySource(images[~held_out], labels[~held_out]),
        "test": ArraySource(images[held_out], labels[held_out]),
    }


# --- folder ------------------------------------------------------------------------------


def _folder_layout_help(root: str) -> str:
    return (
        f"Expected an ImageFolder layout under {root!r}:\n"
        f"  {root}/train/<class name>/<image>.jpg   (one subfolder per class)\n"
        f"  {root}/val/<class name>/<image>.jpg     (same class names)\n"
        "Class k is the k-th class folder name in sorted order; images may be JPEG, PNG, BMP, TIFF, WebP.\n"
        "Set data.folder=<root>, and data.train_split / data.eval_split to other subfolder names if needed."
    )


@functools.lru_cache(maxsize=8)
def scan_folder(root: str, split: str, classes: tuple[str, ...] | None = None) -> tuple[tuple[str, ...], tuple, tuple]:
    """Lists <root>/<split>/<class>/<file>: (class names, file paths, labels), all sorted.

    `classes` fixes the class list (the eval split uses the train split's); otherwise it is the
    sorted subfolder names.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        message = f"No folder {str(split_dir)!r} for split {split!r}.\n"
        raise DatasetNotPreparedError(message + _folder_layout_help(root))
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if classes is None:
        classes = tuple(found)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{split_dir} has class folders absent from the train split: {unknown[:10]}.")
    if not classes:
        raise DatasetNotPreparedError(f"{split_dir} has no class subfolders.\n" + _folder_layout_help(root))
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        with os.scandir(class_dir) as entries:
            files = sorted(e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        paths.extend(files)
        labels.extend([label] * len(files))
        if (label + 1) % 100 == 0:
            logging.info("Scanning %s: %d / %d classes, %d images", split_dir, label + 1, len(classes), len(paths))
    if not paths:
        raise DatasetNotPreparedError(f"{split_dir} holds no image files.\n" + _folder_layout_help(root))
    return classes, tuple(paths), tuple(labels)


# --- TFDS --------------------------------------------------------------------------------


def _tfds_prepare_help(name: str, data_dir: str | None) -> str:
    where = data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"
    dd = data_dir or "<data_dir>"
    if name.split(":")[0] == "imagenet2012":
        return (
            f"TFDS dataset 'imagenet2012' is not prepared in {where}. ImageNet cannot be downloaded "
            "automatically; prepare it once (hours; progress is shown):\n"
            "  1. Download ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB) from\n"
            "     https://image-net.org/download-images (free registration) into one folder, the manual_dir.\n"
            f"  2. python -m biformer_jax.data.prepare --name imagenet2012 --data_dir {dd} --manual_dir <that folder>\n"
            "     (the same as: tfds build imagenet2012 --file_format=array_record "
            f"--data_dir={dd} --manual_dir=<that folder>)\n"
            f"  3. Train with --config.data.data_dir={dd} (gs:// paths work)."
        )
    return (
        f"TFDS dataset {name!r} is not prepared in {where}. Prepare it once (downloads; progress is shown):\n"
        f"  python -m biformer_jax.data.prepare --name {name} --data_dir {dd}\n"
        f"then train with --config.data.data_dir={dd}. Datasets that need manual downloads say where to\n"
        "put the files; pass that folder as --manual_dir."
    )


def _tfds_builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name.split(":")[0], list(known) + list(DATASET_KINDS), n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown dataset name {name!r}: data.name must be 'digits', 'folder' or a TFDS dataset "
            f"(see tfds.list_builders()).{hint}"
        ) from None


def _tfds_keys(builder) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    keys = builder.info.supervised_keys
    if not keys or len(keys) != 2 or not isinstance(builder.info.features[keys[0]], tfds.features.Image):
        raise ValueError(
            f"TFDS dataset {builder.name!r} is not an image-classification dataset (supervised_keys {keys}); "
            "its examples need an image and a class label."
        )
    return keys


def _tfds_check_random_access(builder) -> None:
    from tensorflow_datasets.core import file_adapters

    formats = set(builder.info.available_file_formats())
    if not formats & set(file_adapters.FileFormat.with_random_access()):
        fmts = ", ".join(sorted(f.value for f in formats))
        raise NoRandomAccessError(
            f"TFDS dataset {builder.name!r} in {builder.data_dir} is stored as {fmts}, which has no random access; "
            "the pipeline reads records by index (exact resumption without skipping) and needs array_record.\n"
            f"  Convert it in place: tfds convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record\n"
            "  or rebuild it with python -m biformer_jax.data.prepare (writes array_record)."
        )


def _resolve_tfds_split(builder, split: str) -> str:
    splits = builder.info.splits
    if split:
        try:
            splits[split]
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"TFDS dataset {builder.name!r} has no split {split!r} ({e}); its splits: {sorted(splits)}."
            ) from None
        return split
    for default in ("validation", "test"):
        if default in splits:
            return default
    raise ValueError(f"TFDS dataset {builder.name!r} has neither 'validation' nor 'test'; set data.eval_split.")


@functools.lru_cache(maxsize=8)
def _prepared_tfds(name: str, data_dir: str | None):
    builder = _tfds_builder(name, data_dir)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(_tfds_prepare_help(name, data_dir))
    _tfds_check_random_access(builder)
    return builder


def prepare_tfds(name: str, *, data_dir: str | None = None, manual_dir: str | None = None) -> None:
    """Downloads (or reads manual_dir) and writes a TFDS dataset as array_record, with progress bars."""
    import tensorflow_datasets as tfds

    if name.split(":")[0] == "imagenet2012":
        missing = [t for t in IMAGENET_TARS if not manual_dir or not (Path(manual_dir) / t).is_file()]
        if missing:
            raise DatasetNotPreparedError(
                f"imagenet2012 needs {' and '.join(IMAGENET_TARS)} in --manual_dir; missing in {manual_dir!r}: "
                f"{missing}.\n" + _tfds_prepare_help(name, data_dir)
            )
    _tfds_builder(name, data_dir)  # unknown names fail here, before any download
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    logging.info("Preparing TFDS %s in %s (array_record)", name, builder.data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    _prepared_tfds.cache_clear()


# --- entry points ------------------------------------------------------------------------


def default_eval_split(cfg: ml_collections.ConfigDict) -> str:
    if cfg.eval_split:
        return cfg.eval_split
    return {"digits": "test", "folder": "val"}.get(cfg.name, "")


def open_source(cfg: ml_collections.ConfigDict, which: str):
    """The source of the train or eval split ('train' | 'eval') and its number of classes."""
    validate_config(cfg)
    if cfg.name == "digits":
        split = cfg.train_split if which == "train" else default_eval_split(cfg)
        if split not in ("train", "test"):
            raise ValueError(f"digits has splits 'train' and 'test', not {split!r}.")
        return load_digits(cfg.digits.size, cfg.digits.eval_fraction, cfg.digits.split_seed)[split], 10
    if cfg.name == "folder":
        classes, _, _ = scan_folder(cfg.folder, cfg.train_split)
        if which == "train":
            _, paths, labels = scan_folder(cfg.folder, cfg.train_split)
        else:
            _, paths, labels = scan_folder(cfg.folder, default_eval_split(cfg), classes)
        source = FileSource(paths, np.asarray(labels, np.int32), cache=cfg.cache, bad_images=cfg.bad_images)
        return source, len(classes)
    data_dir = cfg.data_dir or None
    builder = _prepared_tfds(cfg.name, data_dir)
    image_key, label_key = _tfds_keys(builder)
    split = _resolve_tfds_split(builder, cfg.train_split if which == "train" else cfg.eval_split)
    num_classes = builder.info.features[label_key].num_classes
    return TfdsSource(cfg.name, split, data_dir, image_key, label_key, cfg.cache), num_classes


def dataset_info(cfg: ml_collections.ConfigDict) -> DatasetInfo:
    """Sizes of the configured dataset; raises DatasetNotPreparedError (with instructions) if absent."""
    train, num_classes = open_source(cfg, "train")
    evaluation, _ = open_source(cfg, "eval")
    return DatasetInfo(
        num_classes=num_classes,
        num_train_examples=len(train),
        num_eval_examples=len(evaluation),
        image_size=cfg.image_size,
    )
