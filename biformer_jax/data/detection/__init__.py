"""Detection data: COCO instances (pycocotools) read as mmdetection 2.11 reads them, and COCO box AP.

ds = read_coco(*coco_paths(root, "val2017"))          # CocoDetection: images, cat_ids, coco
results = to_coco_results(ids, boxes, scores, labels, counts, ds.cat_ids)
metrics = coco_box_ap(ds.coco, results)                # {"bbox_mAP", "bbox_mAP_50", ...}

Batches (mmdet 2.11's Resize (1333, 800) / RandomFlip / Normalize / Pad 32, in fixed bucket shapes):
it = det_train_iterator(read_coco(*coco_paths(root, "train2017"), train=True), seed=0, start_step=0,
                        global_batch_size=16)  # {"image", "gt_bboxes", "gt_labels", "gt_valid", ...}
it = det_eval_iterator(ds, global_batch_size=8)  # + "valid", "img_shape", "scale_factor", "image_id"
"""

from biformer_jax.data.detection.coco import (
    CocoDetection,
    CocoFormatError,
    CocoImage,
    coco_paths,
    load_image,
    read_coco,
)
from biformer_jax.data.detection.evaluation import (
    METRIC_NAMES,
    SEGM_METRIC_NAMES,
    coco_box_ap,
    coco_mask_ap,
    to_coco_results,
    write_results,
)
from biformer_jax.data.detection.pipeline import det_eval_iterator, det_train_iterator

__all__ = [
    "METRIC_NAMES",
    "SEGM_METRIC_NAMES",
    "CocoDetection",
    "CocoFormatError",
    "CocoImage",
    "coco_box_ap",
    "coco_mask_ap",
    "coco_paths",
    "det_eval_iterator",
    "det_train_iterator",
    "load_image",
    "read_coco",
    "to_coco_results",
    "write_results",
]
