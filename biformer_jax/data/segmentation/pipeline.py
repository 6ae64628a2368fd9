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

from biformer_jax.data.pipeline import _run, train_batches
from biformer_jax.data.segmentation import sources as seg_sources
from biformer_jax.data.segmentation import transforms as seg_transforms
from biformer_jax.data.segmentation.config import eval_views, validate_eval_config


class SegExample:
    """(image, label map), rng -> {'image': float32 (h, w, 3), 'label': (h, w)}: the train transform's crop."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, example, rng: np.random.Generator) -> dict:
        image, label = self.transform(*example, rng)
        return {"image": image, "label": label}


SEG_DTYPES = {"image": np.float32, "label": np.int32}


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
    return train_batches(
        cfg,
        lambda: seg_sources.open_seg_source(cfg, "train")[0],
        SegExample(seg_transforms.SegTrainTransform(cfg)),
        SEG_DTYPES,
        seed=seed,
        start_step=start_step,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


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
