"""Segmentation evaluation: one pass over the eval split, mIoU / mAcc / aAcc as mmseg.

Every process predicts its share of the images (p, p + P, ...) with a full copy of the weights on
its first local device, accumulates the per-class counts, and the counts are summed over
processes, so the result is the single-process result whatever P is.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from biformer_jax.data.segmentation import pipeline as seg_pipeline
from biformer_jax.data.segmentation import sources as seg_sources
from biformer_jax.tasks.segmentation import metrics as seg_metrics
from biformer_jax.tasks.segmentation.inference import Segmenter


def local_copy(variables: Any) -> Any:
    """The whole weights on this process's first device (gathered from every process if sharded)."""
    if jax.process_count() > 1:
        variables = multihost_utils.process_allgather(variables, tiled=True)
    return jax.device_put(jax.device_get(variables), jax.local_devices()[0])


def count_predictions(model, variables, data_cfg, eval_cfg, *, desc: str = "eval") -> seg_metrics.SegCounts:
    """Per-class counts of this process's share of the eval split (not yet summed over processes)."""
    _, names = seg_sources.open_seg_source(data_cfg, "eval")
    segmenter = Segmenter(model, local_copy(variables), eval_cfg)
    counts = seg_metrics.SegCounts.zeros(len(names))
    it = seg_pipeline.seg_eval_iterator(
        data_cfg, eval_cfg, process_index=jax.process_index(), process_count=jax.process_count()
    )
    t0 = time.perf_counter()
    for i, example in enumerate(it):
        label = example["label"]
        pred = segmenter.predict(example["views"], label.shape)
        counts = counts + seg_metrics.intersect_and_union(pred, label, len(names), data_cfg.ignore_index)
        if (i + 1) % 100 == 0:
            logging.info("%s: %d images (%.1f img/s)", desc, i + 1, (i + 1) / (time.perf_counter() - t0))
    return counts


def sum_over_processes(counts: seg_metrics.SegCounts) -> seg_metrics.SegCounts:
    if jax.process_count() == 1:
        return counts
    gathered = multihost_utils.process_allgather(counts.as_array())  # (P, 5, K)
    return seg_metrics.SegCounts.from_array(np.asarray(gathered).sum(0))


def evaluate(model, variables, data_cfg, eval_cfg, *, desc: str = "eval") -> dict[str, Any]:
    """{"mIoU", "mAcc", "aAcc", "num_examples", "IoU", "Acc"} of `variables` on the eval split."""
    counts = sum_over_processes(count_predictions(model, variables, data_cfg, eval_cfg, desc=desc))
    if counts.num_images == 0:
        raise ValueError(f"The eval split of {data_cfg.name!r} yielded no images.")
    summary = seg_metrics.summarize(counts)
    summary["num_examples"] = counts.num_images
    return summary


def scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's scalar entries (what the trainer logs and the final JSON line holds)."""
    return {k: float(summary[k]) for k in ("mIoU", "mAcc", "aAcc")}
