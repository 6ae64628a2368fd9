"""predict.py for detection checkpoints: boxes, classes and scores per image, optionally drawn.

    python predict.py --checkpoint=workdirs/det_quickstart [--score_thr=0.3] [--draw=drawn/] IMAGES...

Each image goes through mmdet's test pipeline at the scale the checkpoint records (Resize keep
ratio, Normalize, Pad 32; no config needed) and the model family's detection (family.detect);
boxes come back in the image's own pixels. One JSON object per image: {"path", "detections":
[{"box": [x1, y1, x2, y2], "score", "label", "class"}, ...]} (score >= --score_thr, best first); a
Mask R-CNN's detections also hold "mask", a COCO RLE ({"size": [h, w], "counts": str}) at the
image's size. With --draw=DIR each image is also written as DIR/<name>_det.png with its boxes
outlined in a colour per class and labelled "<class> <score>", masks filled half-transparent in
the same colour. An image that cannot be read is reported with "error" and skipped.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw

from biformer_jax import storage
from biformer_jax.data.detection import masks as mask_ops
from biformer_jax.data.detection import transforms as T
from biformer_jax.data.detection.coco import CocoFormatError, load_image
from biformer_jax.tasks.detection import family
from biformer_jax.tasks.detection.family import jitted_detect
from biformer_jax.training import checkpoint, loader


@dataclasses.dataclass(frozen=True)
class LoadedDetector:
    model: Any
    variables: Any
    img_scale: tuple[int, int]
    class_names: tuple[str, ...]


def load(path: str, *, ema: bool = False) -> LoadedDetector:
    """A detection checkpoint's model, weights, test scale and class names (from its record)."""
    loaded = loader.load(path, input_size=(128, 128), ema="only" if ema else "no")
    data = loaded.record.get("data", {})
    num_classes = int(loaded.model.num_classes)
    names = tuple(data.get("class_names") or [str(k) for k in range(num_classes)])
    scale = tuple(int(v) for v in data.get("img_scale", T.IMG_SCALE))
    return LoadedDetector(loaded.model, jax.device_put(loaded.variables), scale, names)


def detect_image(det: LoadedDetector, image: np.ndarray) -> list[dict[str, Any]]:
    """Detections of one (H, W, 3) uint8 RGB image: [{"box", "score", "label", "class"}] best first."""
    empty = np.zeros((0, 4), np.float32)
    ex = T.transform(image, empty, empty, False, det.img_scale)
    ph, pw = ex["pad_shape"]
    x = np.zeros((1, ph, pw, 3), np.float32)
    h, w = ex["img_shape"]
    x[0, :h, :w] = ex["image"]
    out = jitted_detect(det.model)(det.variables, x, np.int32([[h, w]]), ex["scale_factor"][None])
    boxes, scores, labels = (np.asarray(a)[0] for a in (out.boxes, out.scores, out.labels))
    count = int(np.asarray(out.count)[0])
    found = [
        {
            "box": [round(float(v), 2) for v in boxes[k]],
            "score": round(float(scores[k]), 4),
            "label": int(labels[k]),
            "class": det.class_names[int(labels[k])],
        }
        for k in range(count)
    ]
    if out.mask_probs is not None:
        rles = family.rle_masks(
            np.asarray(out.mask_probs)[0], boxes, count, image.shape[:2], family.mask_threshold(det.model)
        )
        for d, rle in zip(found, rles):
            d["mask"] = rle
    return found


def colour(label: int) -> tuple[int, int, int]:
    """A distinct bright colour per class (golden-ratio hues)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw(image: np.ndarray, detections: Sequence[dict[str, Any]]) -> Image.Image:
    """The image with each detection's mask (if any) blended at half opacity in its class's colour,
    then its box outlined and labelled "<class> <score>"."""
    pixels = image[..., :3].astype(np.float32).copy()
    for d in detections:
        if "mask" in d:
            m = mask_ops.decode(d["mask"], *image.shape[:2]).astype(bool)
            pixels[m] = 0.5 * pixels[m] + 0.5 * np.float32(colour(d["label"]))
    canvas = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    pen = ImageDraw.Draw(canvas)
    width = max(1, round(min(canvas.size) / 200))
    for d in detections:
        x1, y1, x2, y2 = d["box"]
        c = colour(d["label"])
        pen.rectangle([x1, y1, x2, y2], outline=c, width=width)
        text = f"{d['class']} {d['score']:.2f}"
        left, top, right, bottom = pen.textbbox((x1, y1), text)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        pen.rectangle([x1, ty, x1 + (right - left) + 2, ty + (bottom - top) + 2], fill=c)
        pen.text((x1 + 1, ty), text, fill=(0, 0, 0))
    return canvas


def predict(
    det: LoadedDetector, paths: Sequence[str], *, score_thr: float = 0.3, draw_dir: str | None = None
) -> Iterator[dict[str, Any]]:
    """One record per path: {"path", "detections"} (and "drawn": the PNG written), or {"path", "error"}."""
    for path in paths:
        try:
            image = load_image(path)
        except CocoFormatError as e:
            yield {"path": path, "error": str(e)}
            continue
        found = [d for d in detect_image(det, image) if d["score"] >= score_thr]
        record: dict[str, Any] = {"path": path, "detections": found}
        if draw_dir:
            png = io.BytesIO()
            draw(image, found).save(png, format="PNG")
            target = checkpoint.as_path(draw_dir) / f"{os.path.splitext(os.path.basename(path))[0]}_det.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            record["drawn"] = os.fspath(storage.write_atomically(target, png.getvalue()))
        yield record
