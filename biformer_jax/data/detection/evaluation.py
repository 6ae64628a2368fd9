"""COCO box and mask AP with pycocotools, as mmdetection 2.11's `CocoDataset.evaluate(metric=['bbox', 'segm'])`.

Detections (padded per image with a count, as `retinanet.detect` returns them) become COCO
results (`[x, y, w, h]` with `w = x2 - x1`, the label's category id, the score; with masks also
"segmentation", a COCO RLE); `COCOeval` gives `bbox_mAP` (AP at IoU 0.50:0.95), `bbox_mAP_50`,
`bbox_mAP_75`, `bbox_mAP_s`, `_m`, `_l`, and `segm_mAP`, ... likewise for masks. As mmdet does,
the mask evaluation drops the results' "bbox" so that pycocotools takes each instance's area (for
the small / medium / large ranges) from its mask, not its box.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence

import numpy as np

from biformer_jax.storage import write_atomically

_SUFFIXES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")  # COCOeval.stats[0:6]
METRIC_NAMES = tuple(f"bbox_{s}" for s in _SUFFIXES)
SEGM_METRIC_NAMES = tuple(f"segm_{s}" for s in _SUFFIXES)


def to_coco_results(
    image_ids: Sequence[int], boxes, scores, labels, counts, cat_ids: Sequence[int], segmentations=None
) -> list[dict]:
    """COCO result dicts from padded detections: boxes (N, K, 4) xyxy, scores / labels (N, K), counts (N,);
    `segmentations`: per image a list of its first counts[i] RLEs (each result gains "segmentation")."""
    boxes, scores, labels, counts = (np.asarray(a) for a in (boxes, scores, labels, counts))
    out = []
    for i, image_id in enumerate(image_ids):
        for k in range(int(counts[i])):
            x1, y1, x2, y2 = (float(v) for v in boxes[i, k])
            out.append(
                {
                    "image_id": int(image_id),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(scores[i, k]),
                    "category_id": int(cat_ids[int(labels[i, k])]),
                }
            )
            if segmentations is not None:
                out[-1]["segmentation"] = segmentations[i][k]
    return out


def coco_box_ap(coco_gt, results: list[dict], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """`METRIC_NAMES` -> value from pycocotools' COCOeval on `results` (no results: every AP 0)."""
    return coco_ap(coco_gt, [{k: v for k, v in r.items() if k != "segmentation"} for r in results], "bbox", image_ids)


def coco_mask_ap(coco_gt, results: list[dict], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """`SEGM_METRIC_NAMES` -> value of COCOeval's `segm` on results carrying "segmentation" RLEs."""
    return coco_ap(coco_gt, [{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm", image_ids)


def coco_ap(coco_gt, results: list[dict], iou_type: str, image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCOeval of `iou_type` ('bbox' or 'segm') on copies of `results`: its six AP figures by name."""
    from pycocotools.cocoeval import COCOeval

    names = METRIC_NAMES if iou_type == "bbox" else SEGM_METRIC_NAMES
    if not results:
        return dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to what it is given
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(ev.stats[i]) for i, name in enumerate(names)}


def write_results(path, results: list[dict]) -> None:
    """The COCO results JSON (`detections.json`), written whole or not at all."""
    write_atomically(path, json.dumps(results).encode())
