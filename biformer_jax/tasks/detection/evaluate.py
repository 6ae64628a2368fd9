"""Detection evaluation: COCO box AP (pycocotools) on the eval split; a Mask R-CNN's mask AP too.

Every process detects its rows of each eval batch (det_eval_iterator: mmdet's test pipeline in
the bucket shapes) with a full copy of the weights on its first local device; the padded
detections (boxes already divided by each image's scale factor: original image pixels) are
gathered from every process and scored once with COCOeval, so the result is the single-process
result whatever the number of processes. One compile per bucket shape. A Mask R-CNN's 28x28 mask
probabilities are gathered per batch and pasted at each image's own size on the host
(family.rle_masks), so its results carry RLE masks and `segm_*` metrics join the `bbox_*` ones.

eval.py (`evaluate_checkpoint`) loads a checkpoint (refusing another architecture), evaluates the
raw and, when present, the EMA weights, and writes the COCO results JSON (`detections.json`,
`detections_ema.json`; with "segmentation" RLEs for a Mask R-CNN) into the checkpoint's
directory, next to eval.py's eval_results.json.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from biformer_jax.data.detection import evaluation as det_evaluation
from biformer_jax.data.detection import pipeline as det_pipeline
from biformer_jax.models import from_config
from biformer_jax.tasks.detection import data as det_data
from biformer_jax.tasks.detection import family
from biformer_jax.tasks.segmentation.evaluate import local_copy
from biformer_jax.training import loader

DETECTIONS_FILE = "detections.json"
_FIELDS = ("image_id", "valid", "boxes", "scores", "labels", "count")
jitted_detect = family.jitted_detect


def predict_split(model, variables, config, *, desc: str = "eval") -> dict[str, Any]:
    """Padded detections of every eval image, gathered from every process: {image_id, valid, boxes, ...};
    a Mask R-CNN's also "segmentations": per row the RLEs of its detections."""
    ds = det_data.read_split(config.data, "eval")
    kw = det_data.pipeline_kwargs(config.data)
    it = det_pipeline.det_eval_iterator(
        ds,
        global_batch_size=int(config.eval.batch_size),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **kw,
    )
    detect, weights = jitted_detect(model), local_copy(variables)
    with_mask = family.is_mask_model(model)
    parts: dict[str, list] = {k: [] for k in _FIELDS}
    segmentations: list[list] = []
    t0, seen = time.perf_counter(), 0
    for batch in it:
        dets = detect(weights, batch["image"], batch["img_shape"], batch["scale_factor"])
        out = dict(
            image_id=batch["image_id"].astype(np.int32),
            valid=batch["valid"],
            boxes=np.asarray(dets.boxes, np.float32),
            scores=np.asarray(dets.scores, np.float32),
            labels=np.asarray(dets.labels, np.int32),
            count=np.asarray(dets.count, np.int32),
        )
        if with_mask:
            out["mask_probs"], out["ori_shape"] = np.asarray(dets.mask_probs, np.float32), batch["ori_shape"]
            if jax.process_count() > 1:  # this batch's rows of every process, for the host-side paste
                out = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in out.items()}
            thr = family.mask_threshold(model)
            for row in range(len(out["valid"])):
                rles = []
                if out["valid"][row]:
                    args = (out["mask_probs"][row], out["boxes"][row], out["count"][row], out["ori_shape"][row])
                    rles = family.rle_masks(*args, thr)
                segmentations.append(rles)
        for k in _FIELDS:
            parts[k].append(out[k])
        seen += int(batch["valid"].sum())
        if seen and len(parts["valid"]) % 50 == 0:
            logging.info("%s: %d images (%.1f img/s)", desc, seen, seen / (time.perf_counter() - t0))
    if not parts["valid"]:
        raise ValueError(f"The eval split {ds.annotation_file} yielded no images.")
    local: dict[str, Any] = {k: np.concatenate(v) for k, v in parts.items()}
    if jax.process_count() > 1 and not with_mask:  # (Mask R-CNN's rows were gathered per batch)
        local = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in local.items()}
    if with_mask:
        local["segmentations"] = segmentations
    return local


def coco_results(preds: dict[str, Any], cat_ids) -> tuple[list[dict], list[int]]:
    """(COCO result dicts of the valid rows, with "segmentation" where preds has masks; their image ids)."""
    keep = preds["valid"].astype(bool)
    ids = [int(i) for i in preds["image_id"][keep]]
    segs = preds.get("segmentations")
    if segs is not None:
        segs = [s for s, k in zip(segs, keep) if k]
    results = det_evaluation.to_coco_results(
        ids, preds["boxes"][keep], preds["scores"][keep], preds["labels"][keep], preds["count"][keep], cat_ids, segs
    )
    return results, ids


def evaluate(model, variables, config, *, desc: str = "eval") -> tuple[dict[str, float], list[dict]]:
    """({"bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"}, and a Mask
    R-CNN's "segm_mAP", ... likewise; the COCO results)."""
    ds = det_data.read_split(config.data, "eval")
    results, ids = coco_results(predict_split(model, variables, config, desc=desc), ds.cat_ids)
    image_ids = sorted(set(ids))
    metrics = det_evaluation.coco_box_ap(ds.coco, results, image_ids=image_ids)
    if family.is_mask_model(model):
        metrics.update(det_evaluation.coco_mask_ap(ds.coco, results, image_ids=image_ids))
    return metrics, results


def evaluate_checkpoint(config, checkpoint_path: str) -> dict[str, Any]:
    """eval.py's record: the metrics of the raw (and EMA) weights, "num_examples", "checkpoint", "step",
    "model", "dataset", "detections_file"; the COCO results JSON written next to the checkpoint."""
    ds = det_data.read_split(config.data, "eval")  # the eval split alone: no train2017 needed
    num_classes = ds.num_classes
    model = from_config.model_from_config(config, num_classes)
    loaded = loader.load(
        checkpoint_path,
        input_size=(128, 128),  # shapes only (auto_pad models take any size)
        expect=from_config.model_meta(config, num_classes),
        model=model,
        ema="also",
    )
    ref = loaded.ref
    record: dict[str, Any] = {
        "checkpoint": os.fspath(ref.path),
        "step": ref.step,
        "model": config.model,
        "dataset": config.data.name,
        "num_examples": len(ds.images),
    }
    for key, weights in (("", loaded.variables), ("ema", loaded.ema_variables)):
        if weights is None:
            continue
        metrics, results = evaluate(model, weights, config, desc=f"eval {key}".strip())
        name = DETECTIONS_FILE if not key else DETECTIONS_FILE.replace(".json", f"_{key}.json")
        written = _write_detections(ref.path / name, results) if jax.process_index() == 0 else None
        entry = {**metrics, "detections_file": written}
        if key:
            record[key] = entry
        else:
            record.update(entry)
    return record


def _write_detections(path, results: list[dict]) -> str | None:
    try:
        det_evaluation.write_results(path, results)
        return os.fspath(path)
    except Exception as e:  # noqa: BLE001  (a read-only checkpoint: the metrics still count)
        print(f"warning: could not write the detections to {path} ({type(e).__name__}: {e}).", file=sys.stderr)
        return None
