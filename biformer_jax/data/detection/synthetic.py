"""A tiny COCO-format detection dataset generated on the fly: the detection quickstart's and the tests' data.

    root = write_synthetic_coco("/tmp/det", num_train=256, num_val=32, size=(96, 128))
    # root/annotations/instances_{train,val}2017.json, root/{train,val}2017/*.png

Each image is a textured background (smooth colour gradient plus noise) holding 1 to
`max_objects` filled shapes, one class each: "square" (an axis-aligned rectangle), "disc" (an
ellipse) and "triangle". Boxes are the shapes' exact pixel extents ([x, y, w, h], COCO's
convention); shapes may overlap. Each annotation's "segmentation" is one polygon tracing its
shape's pixels along their edges (a staircase outline: pycocotools rasterises it back to exactly
the painted pixels, the tests check it) and its "area" the pixel count, as COCO's; where a later
shape covers an earlier one the earlier mask still holds the covered pixels (COCO's occluded
instances are drawn the same way). The content is a pure function of (seed, split, index), so
every process that generates the same folder writes the same files; the folder is written to a
temporary sibling and renamed into place, so a half-written dataset is never read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

CLASSES = ("square", "disc", "triangle")
_SPLIT_SALT = {"train2017": 0, "val2017": 1}


def _shape_mask(kind: str, h: int, w: int) -> np.ndarray:
    """(h, w) bool mask of the class's shape filling its box."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "square":
        return np.ones((h, w), bool)
    if kind == "disc":
        cy, cx = (h - 1) / 2, (w - 1) / 2
        return ((yy - cy) / max(h / 2, 1)) ** 2 + ((xx - cx) / max(w / 2, 1)) ** 2 <= 1.0
    # triangle: apex at the top centre, base along the bottom row
    half = (w / 2) * (yy + 1) / h
    return np.abs(xx + 0.5 - w / 2) <= half


def staircase_polygon(mask: np.ndarray, x0: int, y0: int) -> list[float]:
    """COCO polygon [x1, y1, x2, y2, ...] of a shape whose rows are each one run of pixels, offset by
    (x0, y0): down the runs' right ends, up their left ends, along the pixel edges, collinear points
    dropped. pycocotools' rasteriser gives back exactly the mask's pixels."""
    rows = [(y, np.flatnonzero(mask[y])) for y in range(mask.shape[0])]
    runs = [(y, int(xs[0]), int(xs[-1]) + 1) for y, xs in rows if len(xs)]
    points = [p for y, _, r in runs for p in ((r, y), (r, y + 1))]
    points += [p for y, left, _ in reversed(runs) for p in ((left, y + 1), (left, y))]
    outline: list[tuple[int, int]] = []
    for p in points:
        if outline and outline[-1] == p:
            continue
        while len(outline) >= 2 and (
            outline[-2][0] == outline[-1][0] == p[0] or outline[-2][1] == outline[-1][1] == p[1]
        ):
            outline.pop()  # the middle of three collinear points
        outline.append(p)
    return [float(v) for x, y in outline for v in (x0 + x, y0 + y)]


def draw_example(seed: int, split: str, index: int, size: tuple[int, int], max_objects: int, obj_range):
    """(image (H, W, 3) uint8, boxes [[x, y, w, h], ...], class indices, (polygon, pixel count) per
    shape) of one generated image."""
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], index])
    h, w = size
    base = rng.uniform(40, 215, 3)
    tilt = rng.uniform(-40, 40, 3)
    ramp = np.linspace(-1, 1, w)[None, :, None] * tilt
    image = base + ramp + rng.normal(0, 12, (h, w, 3))
    boxes, labels, shapes = [], [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(CLASSES)))
        bh, bw = (int(rng.integers(obj_range[0], obj_range[1] + 1)) for _ in range(2))
        bh, bw = min(bh, h), min(bw, w)
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        colour = (base + rng.choice([-1, 1], 3) * rng.uniform(70, 110, 3)) % 256
        mask = _shape_mask(CLASSES[label], bh, bw)
        region = image[y0 : y0 + bh, x0 : x0 + bw]
        region[mask] = colour + rng.normal(0, 6, (int(mask.sum()), 3))
        boxes.append([x0, y0, bw, bh])
        labels.append(label)
        shapes.append((staircase_polygon(mask, x0, y0), int(mask.sum())))
    return np.clip(image, 0, 255).astype(np.uint8), boxes, labels, shapes


def _write_split(root: str, split: str, n: int, seed: int, size, max_objects: int, obj_range) -> None:
    os.makedirs(os.path.join(root, split))
    images, annotations = [], []
    for i in range(n):
        image, boxes, labels, shapes = draw_example(seed, split, i, size, max_objects, obj_range)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(os.path.join(root, split, name))
        images.append({"id": i + 1, "file_name": name, "height": size[0], "width": size[1]})
        for box, label, (polygon, area) in zip(boxes, labels, shapes):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(area),
                    "segmentation": [polygon],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)]
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def write_synthetic_coco(
    root: str,
    *,
    num_train: int,
    num_val: int,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    max_objects: int = 3,
    obj_range: tuple[int, int] = (24, 56),
) -> str:
    """Generates the dataset at `root` unless it is there already (COCO 2017's layout); returns root."""
    if os.path.isfile(os.path.join(root, "annotations", "instances_val2017.json")):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic_coco_", dir=parent)
    try:
        os.makedirs(os.path.join(tmp, "annotations"))
        for split, n in (("train2017", num_train), ("val2017", num_val)):
            _write_split(tmp, split, n, seed, tuple(size), max_objects, tuple(obj_range))
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: its copy is the same
            if not os.path.isfile(os.path.join(root, "annotations", "instances_val2017.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_root(num_train: int, num_val: int, size, seed: int, max_objects: int, obj_range) -> str:
    """A folder under the system's temporary directory named by the dataset's parameters."""
    h, w = size
    # "_m": the version with segmentations (folders written before them lack the masks)
    tag = f"n{num_train}-{num_val}_{h}x{w}_s{seed}_k{max_objects}_o{obj_range[0]}-{obj_range[1]}_m"
    return os.path.join(tempfile.gettempdir(), f"biformer_jax_synthetic_coco_{tag}")
