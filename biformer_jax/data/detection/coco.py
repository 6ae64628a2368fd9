"""COCO 2017 instances read as mmdetection 2.11's `CocoDataset` reads them (pycocotools).

Layout: `ROOT/annotations/instances_{train,val}2017.json`, `ROOT/{train,val}2017/*.jpg`.
Per image, as mmdet's `_parse_ann_info`: annotations with `ignore` set are dropped; a box whose
intersection with the image is empty, whose area is <= 0, or whose width or height is below 1 is
dropped; crowd boxes (`iscrowd`) become ignore boxes; boxes are `[x, y, x + w, y + h]` (no +1);
labels are the category's index among the sorted category ids (COCO's 80 of ids 1..90 -> 0..79).
Training, as mmdet's `_filter_imgs` (`filter_empty_gt=True`, `min_size=32`): images without any
annotation (crowd included) or smaller than 32 pixels on a side are skipped.

With `with_mask=True` (Mask R-CNN) each kept box also keeps its annotation's "segmentation"
(polygons or RLE, decoded per batch: masks.py), as mmdet's `gt_masks_ann`; crowd regions stay
ignore boxes without a mask, as in mmdet.

Bad input: a missing annotation file, an image the json names that the folder lacks, a box
lying outside its image (beyond a rounding slack) or, with masks, an unusable segmentation (a
polygon of fewer than 3 points, an empty mask, an RLE of another size: masks.segmentation_problem)
raises `CocoFormatError` naming the file, the annotation id and what to do; with
`on_bad_box="skip"` such annotations are dropped and logged instead. `load_image`
names the file of an image that cannot be decoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import Sequence

import numpy as np

from biformer_jax.data.detection import masks

BAD_BOX_CHOICES = ("error", "skip")
_SLACK = 1.0  # pixels a box may overhang its image (annotation tools round outwards)


class CocoFormatError(ValueError):
    """A COCO annotation file, image folder or image that cannot be used as it is."""


@dataclasses.dataclass(frozen=True)
class CocoImage:
    """One image: `boxes` (k, 4) float32 xyxy, `labels` (k,) int32 in [0, C), `ignore` (j, 4) crowd boxes,
    `segmentations` the k boxes' COCO segmentations (read with with_mask=True; else empty)."""

    image_id: int
    path: str
    height: int
    width: int
    boxes: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    segmentations: tuple = ()


@dataclasses.dataclass
class CocoDetection:
    """The images of one COCO split, parsed once; `coco` is the pycocotools `COCO` (for evaluation)."""

    annotation_file: str
    image_dir: str
    coco: object
    cat_ids: list[int]
    images: list[CocoImage]

    @property
    def class_names(self) -> list[str]:
        return [self.coco.cats[c]["name"] for c in self.cat_ids]

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)


def coco_paths(root: str, split: str) -> tuple[str, str]:
    """(annotation file, image folder) of `split` ('train2017', 'val2017') under a COCO root."""
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)


def read_coco(
    annotation_file: str,
    image_dir: str,
    train: bool = False,
    min_size: int = 32,
    on_bad_box: str = "error",
    check_files: bool = True,
    with_mask: bool = False,
) -> CocoDetection:
    """Parses a COCO instances json into `CocoDetection` (see the module for the rules)."""
    from pycocotools.coco import COCO

    if on_bad_box not in BAD_BOX_CHOICES:
        raise ValueError(f"on_bad_box={on_bad_box!r} is not one of {BAD_BOX_CHOICES}.")
    if not os.path.isfile(annotation_file):
        raise CocoFormatError(
            f"COCO annotation file {annotation_file} not found: expected ROOT/annotations/instances_<split>.json "
            "as in the COCO 2017 download (annotations_trainval2017.zip)."
        )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco = COCO(annotation_file)
        except (ValueError, KeyError, TypeError) as e:
            raise CocoFormatError(f"{annotation_file} is not a COCO instances json: {e}") from e
    present = set(os.listdir(image_dir)) if check_files and os.path.isdir(image_dir) else None
    if check_files and present is None:
        raise CocoFormatError(f"COCO image folder {image_dir} not found (annotations: {annotation_file}).")
    cat_ids = sorted(coco.getCatIds())
    cat2label = {c: i for i, c in enumerate(cat_ids)}
    images = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        name = info["file_name"]
        if present is not None and name not in present:
            raise CocoFormatError(
                f"{annotation_file} names image {name} (id {image_id}) but {image_dir} has no such file: "
                "check the split's image folder (train2017 / val2017) is complete."
            )
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        if train and (not anns or min(info["width"], info["height"]) < min_size):
            continue
        boxes, labels, ignore, segs = _parse(anns, info, cat2label, annotation_file, on_bad_box, with_mask)
        path = os.path.join(image_dir, name)
        images.append(CocoImage(image_id, path, info["height"], info["width"], boxes, labels, ignore, segs))
    return CocoDetection(annotation_file, image_dir, coco, cat_ids, images)


def _parse(anns: Sequence[dict], info: dict, cat2label: dict, annotation_file: str, on_bad_box: str, with_mask: bool):
    width, height = info["width"], info["height"]
    boxes, labels, ignore, segs = [], [], [], []
    for ann in anns:
        if ann.get("ignore", False):
            continue
        x1, y1, w, h = ann["bbox"]
        if x1 < -_SLACK or y1 < -_SLACK or x1 + w > width + _SLACK or y1 + h > height + _SLACK:
            where = f"annotation {ann.get('id')} of image {info['file_name']} in {annotation_file}"
            message = f"{where}: box [x, y, w, h] = {ann['bbox']} lies outside the {width}x{height} image"
            if on_bad_box == "error":
                raise CocoFormatError(message + " (pass on_bad_box='skip' to drop such boxes).")
            logging.warning("%s: skipped.", message)
            continue
        inter_w = max(0, min(x1 + w, width) - max(x1, 0))
        inter_h = max(0, min(y1 + h, height) - max(y1, 0))
        if inter_w * inter_h == 0 or ann["area"] <= 0 or w < 1 or h < 1:
            continue
        if ann["category_id"] not in cat2label:
            continue
        box = [x1, y1, x1 + w, y1 + h]
        if ann.get("iscrowd", False):
            ignore.append(box)
            continue
        if with_mask:
            problem = masks.segmentation_problem(ann.get("segmentation"), height, width)
            if problem is not None:
                where = f"annotation {ann.get('id')} of image {info['file_name']} in {annotation_file}"
                if on_bad_box == "error":
                    raise CocoFormatError(f"{where} {problem} (pass on_bad_box='skip' to drop such annotations).")
                logging.warning("%s %s: skipped.", where, problem)
                continue
            segs.append(ann["segmentation"])
        boxes.append(box)
        labels.append(cat2label[ann["category_id"]])
    as_boxes = lambda b: np.asarray(b, np.float32).reshape(-1, 4)  # noqa: E731
    return as_boxes(boxes), np.asarray(labels, np.int32), as_boxes(ignore), tuple(segs)


def load_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB; a file that cannot be decoded raises CocoFormatError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise CocoFormatError(f"image {path} cannot be decoded ({e}): re-download or remove it.") from e
