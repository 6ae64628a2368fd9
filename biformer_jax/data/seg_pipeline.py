"""Segmentation batches: deterministic per (seed, step), resumable, host-sharded.

Train: the classification pipeline's sampler (pipeline.TrainSampler, no repeats) picks the
records of global step s, and row j is augmented by the mmseg train transforms with the
Generator of (seed, s, j), so the batch of a step does not depend on how many hosts read it or
where the run restarted. Host p of P yields rows [p B / P, (p + 1) B / P).

Eval: one image at a time (images differ in size, as in the official single-image test loop).
Host p of P takes images p, p + P, p + 2P, ...; each example holds the label at its own size and
the normalised network input of every test view (ratio, flip is applied on device).
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import ml_collections
import numpy as np

from biformer_jax.data import seg_sources, seg_transforms
from biformer_jax.data.pipeline import _MAX_STEPS, TrainSampler, _host_rows, _run, example_rng
from biformer_jax.data.seg_config import eval_views, validate_eval_config


class SegTrainBatch:
    """Step -> this host's rows: {'image': float32 (b, h, w, 3), 'label': int32 (b, h, w)}."""

    def __init__(self, source, transform, sampler: TrainSampler, seed: int, rows: range):
        self.source, self.transform, self.sampler, self.seed, self.rows = source, transform, sampler, seed, rows

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        records = self.sampler.records(step)[self.rows.start : self.rows.stop]
        examples = self.source.read([int(r) for r in records])
        out = [
            self.transform(img, label, example_rng(self.seed, step, row))
            for row, (img, label) in zip(self.rows, examples)
        ]
        return {
            "image": np.stack([o[0] for o in out]).astype(np.float32, copy=False),
            "label": np.stack([o[1] for o in out]).astype(np.int32),
        }


def seg_train_iterator(
    cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator over this host's train batches; the k-th is global step start_step + k."""
    rows = _host_rows(global_batch_size, process_index, process_count)
    if start_step < 0 or seed < 0:
        raise ValueError(f"seed and start_step must be >= 0, got seed={seed}, start_step={start_step}.")
    source, _ = seg_sources.open_seg_source(cfg, "train")
    sampler = TrainSampler(len(source), global_batch_size, 1, seed)
    make_batch = SegTrainBatch(source, seg_transforms.SegTrainTransform(cfg), sampler, seed, rows)
    return _run(grain.MapDataset.range(start_step, _MAX_STEPS).map(make_batch), cfg)


class SegEvalExample:
    """Image index -> {'index', 'label' int32 (H, W), 'views': [(ratio, flip, float32 (h, w, 3))]}."""

    def __init__(self, source, data_cfg, eval_cfg):
        self.source = source
        self.views = eval_views(eval_cfg)
        self.scale, self.divisor = tuple(eval_cfg.scale), int(eval_cfg.size_divisor)
        self.mean, self.std = tuple(data_cfg.mean), tuple(data_cfg.std)

    def __call__(self, index: int) -> dict:
        (img, label) = self.source.read([int(index)])[0]
        cache: dict[float, np.ndarray] = {}
        views = []
        for ratio, flip in self.views:
            if ratio not in cache:
                cache[ratio] = seg_transforms.test_view(img, self.scale, ratio, self.divisor, self.mean, self.std)
            views.append((ratio, flip, cache[ratio]))
        return {"index": int(index), "label": label.astype(np.int32), "image": img, "views": views}


def num_eval_examples(num_examples: int, eval_cfg) -> int:
    return num_examples if eval_cfg.max_examples <= 0 else min(num_examples, int(eval_cfg.max_examples))


def seg_eval_iterator(
    data_cfg: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict, *, process_index: int, process_count: int
) -> Iterator[dict]:
    """One pass over this host's share of the eval split (images p, p + P, ...), in order."""
    validate_eval_config(eval_cfg)
    source, _ = seg_sources.open_seg_source(data_cfg, "eval")
    total = num_eval_examples(len(source), eval_cfg)
    indices = list(range(process_index, total, process_count))
    dataset = grain.MapDataset.source(indices).map(SegEvalExample(source, data_cfg, eval_cfg))
    return _run(dataset, data_cfg)
