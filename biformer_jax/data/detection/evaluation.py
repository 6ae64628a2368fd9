"""COCO box AP with pycocotools, as mmdetection 2.11's `CocoDataset.evaluate(metric='bbox')` reports it.

Detections (padded per image with a count, as `retinanet.detect` returns them) become COCO
results (`[x, y, w, h]` with `w = x2 - x1`, the label's category id, the score); `COCOeval` gives
`bbox_mAP` (AP at IoU 0.50:0.95), `bbox_mAP_50`, `bbox_mAP_75`, `bbox_mAP_s`, `_m`, `_l`.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence

import numpy as np

from biformer_jax.storage import write_atomically

METRIC_NAMES = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")


def to_coco_results(image_ids: Sequence[int], boxes, scores, labels, counts, cat_ids: Sequence[int]) -> list[dict]:
    """COCO result dicts from padded detections: boxes (N, K, 4) xyxy, scores / labels (N, K), counts (N,)."""
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
    return out


def coco_box_ap(coco_gt, results: list[dict], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """`METRIC_NAMES` -> value from pycocotools' COCOeval on `results` (no results: every AP 0)."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(METRIC_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(ev.stats[i]) for i, name in enumerate(METRIC_NAMES)}


def write_results(path, results: list[dict]) -> None:
    """The COCO results JSON (`detections.json`), written whole or not at all."""
    write_atomically(path, json.dumps(results).encode())
