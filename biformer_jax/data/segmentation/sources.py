"""Random-access segmentation sources: ADE20K's folder, any images + PNG label maps, generated shapes.

A source maps a record index to (image uint8 (H, W, 3) RGB, label uint8 (H, W)) with the label
already in training ids: reduce_zero_label applied (0 -> 255, k -> k - 1), 255 ignored. Every
read checks what the model would otherwise silently learn from: the label map has its image's
size, and every id is < num_classes or the ignore index; the error names the file and the fix.
A file that cannot be decoded (truncated, not an image) raises BadImageError naming it, or, with
`data.bad_images='skip'`, is logged with its path and the next readable example is used instead.

Layout (ADE20K's ADEChallengeData2016, and `seg_folder` datasets):

    <root>/images/<split>/<name>.jpg          any PIL format (ADE20K: .jpg)
    <root>/annotations/<split>/<name>.png     one channel (L or P mode), value = class id
    <root>/classes.txt                        seg_folder only: one class name per line
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from biformer_jax.data.segmentation import ade20k_meta
from biformer_jax.data.segmentation.config import validate_seg_config
from biformer_jax.data.sources import IMAGE_EXTENSIONS, BadImageError, DatasetNotPreparedError

ADE20K_ZIP = "ADEChallengeData2016.zip"
ADE20K_SPLIT_SIZES = {"training": 20210, "validation": 2000}


class SegDataError(ValueError):
    """A segmentation example is malformed; the message names the file and what to fix."""


@dataclasses.dataclass(frozen=True)
class SegDatasetInfo:
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    class_names: tuple[str, ...]
    image_size: tuple[int, int]  # the train crop (h, w): the shape train batches have


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 -> 255 (ignored), k -> k - 1 (255 stays 255)."""
    label = label.astype(np.int32)
    out = label - 1
    out[label == 0] = 255
    out[label == 255] = 255
    return out.astype(np.uint8)


def check_label(label: np.ndarray, num_classes: int, ignore_index: int, where: str, reduced: bool) -> None:
    """Raises SegDataError when an id is neither < num_classes nor the ignore index."""
    ids = np.unique(label)
    bad = ids[(ids >= num_classes) & (ids != ignore_index)]
    if bad.size:
        shown = (bad + 1 if reduced else bad)[:10].tolist()  # as stored in the file
        raise SegDataError(
            f"{where}: class ids {shown} (as stored in the file) are not in the dataset's {num_classes} classes "
            f"and not the ignore index {ignore_index}"
            + (" (after reduce_zero_label: stored id k is class k - 1)" if reduced else "")
            + ". Fix the label map, or set data.num_classes / class_names_file / reduce_zero_label to match it."
        )


def _decode(data: bytes, where: str, what: str) -> Image.Image:
    """The fully decoded PIL image of `data` (the file `where`); BadImageError naming it if it cannot be."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # a truncated file opens (header only) and fails here
        return img
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL: UnidentifiedImageError, truncated
        raise BadImageError(
            f"Cannot decode the {what} file {where} ({type(e).__name__}: {e}). Remove or replace it, or set "
            "data.bad_images='skip' to train without it."
        ) from e


def _open_label(data: bytes, where: str) -> np.ndarray:
    img = _decode(data, where, "label map")
    if img.mode not in ("L", "P", "I", "I;16"):
        raise SegDataError(
            f"{where}: label maps must have one channel (PIL mode L or P, value = class id), got mode {img.mode}."
        )
    label = np.asarray(img)
    if label.max(initial=0) > 255:
        raise SegDataError(f"{where}: label ids above 255 ({label.max()}); labels are stored as 8-bit ids.")
    return label.astype(np.uint8)


class SegFileSource:
    """Image files and their label PNGs, read by index and checked."""

    def __init__(
        self,
        image_paths: Sequence[str],
        label_paths: Sequence[str],
        *,
        num_classes: int,
        reduce_zero_label: bool,
        ignore_index: int = 255,
        cache: bool = False,
        bad_images: str = "error",
    ):
        self.image_paths, self.label_paths = list(image_paths), list(label_paths)
        self.num_classes, self.reduce_zero_label, self.ignore_index = num_classes, reduce_zero_label, ignore_index
        self.cache, self.bad_images = cache, bad_images
        self._cache: dict[int, tuple[bytes, bytes]] = {}

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}

    def _bytes(self, i: int) -> tuple[bytes, bytes]:
        if i in self._cache:
            return self._cache[i]
        label_path = Path(self.label_paths[i])
        if not label_path.is_file():
            raise SegDataError(
                f"Missing annotation {label_path} for image {self.image_paths[i]}. Every image needs a label "
                "PNG of the same name under annotations/<split>/ (python -m biformer_jax.data.prepare lists them)."
            )
        data = Path(self.image_paths[i]).read_bytes(), label_path.read_bytes()
        if self.cache:
            self._cache[i] = data
        return data

    def read_one(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Example i, or with bad_images='skip' the next one whose files decode (each skip logged)."""
        for offset in range(len(self)):
            j = (i + offset) % len(self)
            try:
                return self._read_checked(j)
            except BadImageError as e:
                if self.bad_images != "skip":
                    raise
                logging.getLogger(__name__).warning("%s Skipped: using the next example instead.", e)
        raise BadImageError(f"None of the {len(self)} examples can be decoded (first: {self.image_paths[0]}).")

    def _read_checked(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image_bytes, label_bytes = self._bytes(i)
        image = np.asarray(_decode(image_bytes, self.image_paths[i], "image").convert("RGB"))
        label = _open_label(label_bytes, self.label_paths[i])
        if label.shape != image.shape[:2]:
            raise SegDataError(
                f"{self.label_paths[i]}: label map is {label.shape[1]}x{label.shape[0]} (w x h) but its image "
                f"{self.image_paths[i]} is {image.shape[1]}x{image.shape[0]}; a label map must have its image's size."
            )
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        check_label(label, self.num_classes, self.ignore_index, self.label_paths[i], self.reduce_zero_label)
        return image, label

    def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.read_one(int(i)) for i in indices]


# --- folders -----------------------------------------------------------------------------


def layout_help(root: str) -> str:
    return (
        f"Expected under {root!r}:\n"
        f"  {root}/images/<split>/<name>.jpg        (training / validation for ADE20K)\n"
        f"  {root}/annotations/<split>/<name>.png   (one channel, value = class id, same size as the image)\n"
        "ADE20K: unpack ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/) and point\n"
        "data.root at the ADEChallengeData2016 folder, or run\n"
        "  python -m biformer_jax.data.prepare --name ade20k --root <dir>/ADEChallengeData2016 [--zip <the zip>]"
    )


@functools.lru_cache(maxsize=16)
def scan_split(root: str, split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(image paths, label paths) of <root>/images/<split>, sorted by file name, labels by stem.

    A missing annotation fails here, listing the first ones, before any training.
    """
    image_dir, label_dir = Path(root) / "images" / split, Path(root) / "annotations" / split
    for d in (image_dir, label_dir):
        if not d.is_dir():
            raise DatasetNotPreparedError(f"No folder {str(d)!r} (split {split!r}).\n" + layout_help(root))
    with os.scandir(image_dir) as entries:
        images = sorted(e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if not images:
        raise DatasetNotPreparedError(f"{image_dir} holds no image files.\n" + layout_help(root))
    with os.scandir(label_dir) as entries:
        labels = {e.name for e in entries if e.is_file()}
    label_names = [Path(name).stem + ".png" for name in images]
    missing = [n for n in label_names if n not in labels]
    if missing:
        raise SegDataError(
            f"{len(missing)} of {len(images)} images in {image_dir} have no annotation in {label_dir}, e.g. "
            f"{missing[:5]}. Each image <name>.jpg needs annotations/{split}/<name>.png; add them or remove "
            "those images."
        )
    return tuple(str(image_dir / n) for n in images), tuple(str(label_dir / n) for n in label_names)


def read_class_names(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    if cfg.name == "ade20k":
        return ade20k_meta.CLASS_NAMES
    if cfg.name == "shapes":
        from biformer_jax.data.segmentation import shapes

        return shapes.CLASS_NAMES
    path = Path(cfg.class_names_file or Path(cfg.root) / "classes.txt")
    if not path.is_file():
        raise DatasetNotPreparedError(
            f"No class list {str(path)!r}: a seg_folder dataset needs a text file with one class name per line "
            "(class k = line k, after reduce_zero_label); set data.class_names_file or write <root>/classes.txt."
        )
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise SegDataError(f"{path} lists no class names.")
    return names


# --- entry points ------------------------------------------------------------------------


def open_seg_source(cfg: ml_collections.ConfigDict, which: str):
    """The source of the train or eval split ('train' | 'eval') and the class names."""
    validate_seg_config(cfg)
    names = read_class_names(cfg)
    if cfg.name == "shapes":
        from biformer_jax.data.segmentation import shapes

        return shapes.load_shapes(cfg.shapes.size, cfg.shapes.num_train, cfg.shapes.num_eval, cfg.shapes.seed)[
            which
        ], names
    split = cfg.train_split if which == "train" else cfg.eval_split
    images, labels = scan_split(cfg.root, split)
    source = SegFileSource(
        images,
        labels,
        num_classes=len(names),
        reduce_zero_label=cfg.reduce_zero_label,
        ignore_index=cfg.ignore_index,
        cache=cfg.cache,
        bad_images=cfg.bad_images,
    )
    return source, names


def seg_dataset_info(cfg: ml_collections.ConfigDict) -> SegDatasetInfo:
    """Sizes and classes of the configured dataset; raises DatasetNotPreparedError saying how to fix it."""
    train, names = open_seg_source(cfg, "train")
    evaluation, _ = open_seg_source(cfg, "eval")
    return SegDatasetInfo(
        num_classes=len(names),
        num_train_examples=len(train),
        num_eval_examples=len(evaluation),
        class_names=names,
        image_size=tuple(int(s) for s in cfg.crop_size),
    )
