"""Detection data: COCO instances (pycocotools) read as mmdetection 2.11 reads them, and COCO box AP.

ds = read_coco(*coco_paths(root, "val2017"))          # CocoDetection: images, cat_ids, coco
results = to_coco_results(ids, boxes, scores, labels, counts, ds.cat_ids)
metrics = coco_box_ap(ds.coco, results)                # {"bbox_mAP", "bbox_mAP_50", ...}
"""

from biformer_jax.data.detection.coco import (
    CocoDetection,
    CocoFormatError,
    CocoImage,
    coco_paths,
    load_image,
    read_coco,
)
from biformer_jax.data.detection.evaluation import METRIC_NAMES, coco_box_ap, to_coco_results, write_results

__all__ = [
    "METRIC_NAMES",
    "CocoDetection",
    "CocoFormatError",
    "CocoImage",
    "coco_box_ap",
    "coco_paths",
    "load_image",
    "read_coco",
    "to_coco_results",
    "write_results",
]
