"""COCO detection batches in a few fixed shapes: deterministic per (seed, step), resumable, host-sharded.

Buckets. Every image is assigned, from its json size alone, to the smallest bucket (a padded
(height, width), transforms.DEFAULT_BUCKETS) that holds its resized, 32-padded image, and every
batch draws its images from one bucket, as mmdet's GroupSampler draws each batch from one aspect
group (it has two groups, w > h or not; the buckets split them finer so that less is padded).
A batch's image is (B, bucket_h, bucket_w, 3), so a COCO epoch costs at most one train-step
compile per bucket: 6 with the default buckets (3 landscape: 800 x 1088 / 1216 / 1344, and their
portrait mirrors), whatever the number of steps; evaluation likewise at most 6 (one per bucket).

Train: epoch e's plan (a Generator of (seed, e)): each bucket's images shuffled, its last batch
filled with images of the same bucket drawn at random (mmdet's GroupSampler fill), the batches of
all buckets shuffled together; steps_per_epoch = sum over buckets of ceil(n / B). Row j of step s
flips with the Generator of (seed, s, j) (pipeline.example_rng), so the batch of a step does not
depend on the number of hosts or on where the run restarted (start_step). Host p of P yields rows
[p B / P, (p + 1) B / P).

Eval: images in order within each bucket, buckets in order; each bucket's last batch padded with
rows whose `valid` is False. No flip. Each row keeps its image id, original size and scale factor,
so `retinanet.detect(..., image_sizes=img_shape, scale_factors=scale_factor)` returns boxes in the
original image's pixels.

Ground truth is padded to `max_boxes` rows (`gt_valid` marks the real ones) and crowd boxes to
`max_ignore` (`gt_ignore_valid`); with `with_mask` (Mask R-CNN, train batches) every box's mask
comes too, decoded from its segmentation, resized and flipped with the image, zero-padded to the
bucket and bit-packed along the width: "gt_masks" (B, max_boxes, bucket_h, bucket_w / 8) uint8
(masks.unpack gives (..., bucket_w) bool); an image with more is refused when the pipeline is built,
naming the image and the setting to raise. Bad files surface from coco.read_coco / load_image
with the file's name.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import ml_collections
import numpy as np

from biformer_jax.data.detection import masks
from biformer_jax.data.detection import transforms as T
from biformer_jax.data.detection.coco import CocoDetection, load_image
from biformer_jax.data.pipeline import _MAX_STEPS, _host_rows, _run, example_rng

_PLAN_SALT = 0x0DE7  # separates the batch plan's stream from the rows' flip streams


def assign_buckets(ds: CocoDetection, buckets=T.DEFAULT_BUCKETS, scale=T.IMG_SCALE) -> np.ndarray:
    """(N,) int bucket index of every image of `ds` (from the json's sizes; no decoding)."""
    return np.array([T.bucket_of(im.height, im.width, buckets, scale) for im in ds.images], np.int64)


def check_counts(ds: CocoDetection, max_boxes: int, max_ignore: int) -> None:
    """Refuses a dataset holding an image with more boxes (or crowd boxes) than the padded rows."""
    for im in ds.images:
        for what, n, limit, name in (
            ("boxes", len(im.boxes), max_boxes, "max_boxes"),
            ("crowd boxes", len(im.ignore), max_ignore, "max_ignore"),
        ):
            if n > limit:
                raise ValueError(
                    f"image {im.path} (id {im.image_id}) has {n} {what}, more than {name}={limit}: raise {name}."
                )


class BucketSampler:
    """Global step -> (bucket, (B,) image indices), the batches of an epoch grouped by bucket."""

    def __init__(self, bucket_ids: np.ndarray, global_batch_size: int, seed: int):
        self.batch, self.seed = global_batch_size, seed
        self.groups = [np.flatnonzero(bucket_ids == b) for b in range(int(bucket_ids.max(initial=-1)) + 1)]
        self.steps_per_epoch = sum(-(-len(g) // global_batch_size) for g in self.groups)
        if self.steps_per_epoch == 0:
            raise ValueError("the training set is empty: no image to sample.")
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self):
        return {**self.__dict__, "_plans": {}}

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(steps,) bucket of each batch of `epoch`, (steps, B) its image indices."""
        plans = self._plans
        if epoch not in plans:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_PLAN_SALT, self.seed, epoch])))
            buckets, rows = [], []
            for b, group in enumerate(self.groups):
                if not len(group):
                    continue
                order = rng.permutation(group)
                fill = rng.choice(group, (-len(group)) % self.batch)
                chunks = np.concatenate([order, fill]).reshape(-1, self.batch)  # (batches of b, B)
                rows.append(chunks)
                buckets += [b] * len(chunks)
            perm = rng.permutation(len(buckets))
            plan = (np.asarray(buckets, np.int64)[perm], np.concatenate(rows)[perm])
            # keep the newest two (threads may straddle an epoch); one assignment, never torn
            plans = {**{e: plans[e] for e in sorted(plans)[-1:]}, epoch: plan}
            self._plans = plans
        return plans[epoch]

    def batch_of(self, step: int) -> tuple[int, np.ndarray]:
        epoch, k = divmod(int(step), self.steps_per_epoch)
        buckets, rows = self.plan(epoch)
        return int(buckets[k]), rows[k]


def _collate(
    examples: list, bucket_hw, max_boxes: int, max_ignore: int, ds: CocoDetection, indices, with_mask: bool = False
) -> dict:
    """Pads each transformed example into one batch of the bucket's shape (rows with index -1 stay empty)."""
    b, (h, w) = len(indices), bucket_hw
    out = dict(
        image=np.zeros((b, h, w, 3), np.float32),
        gt_bboxes=np.zeros((b, max_boxes, 4), np.float32),
        gt_labels=np.zeros((b, max_boxes), np.int32),
        gt_valid=np.zeros((b, max_boxes), bool),
        gt_bboxes_ignore=np.zeros((b, max_ignore, 4), np.float32),
        gt_ignore_valid=np.zeros((b, max_ignore), bool),
        img_shape=np.tile(np.int32([h, w]), (b, 1)),
        pad_shape=np.tile(np.int32([h, w]), (b, 1)),
        ori_shape=np.tile(np.int32([h, w]), (b, 1)),
        scale_factor=np.ones((b, 4), np.float32),
        flip=np.zeros((b,), bool),
        image_id=np.full((b,), -1, np.int64),
        valid=np.zeros((b,), bool),
    )
    if with_mask:
        out["gt_masks"] = np.zeros((b, max_boxes, h, w // 8), np.uint8)
    for row, (index, ex) in enumerate(zip(indices, examples)):
        if ex is None:
            continue
        ih, iw = ex["img_shape"]
        out["image"][row, :ih, :iw] = ex["image"]
        k, j = len(ex["boxes"]), len(ex["ignore"])
        out["gt_bboxes"][row, :k], out["gt_valid"][row, :k] = ex["boxes"], True
        out["gt_labels"][row, :k] = ds.images[index].labels
        out["gt_bboxes_ignore"][row, :j], out["gt_ignore_valid"][row, :j] = ex["ignore"], True
        if with_mask:
            padded = np.zeros((k, h, w), np.uint8)
            padded[:, :ih, :iw] = ex["masks"]  # BitmapMasks.pad: zeros on the bottom and right
            out["gt_masks"][row, :k] = masks.pack(padded)
        for key in ("img_shape", "pad_shape", "ori_shape", "scale_factor", "flip"):
            out[key][row] = ex[key]
        out["image_id"][row], out["valid"][row] = ds.images[index].image_id, True
    return out


class DetTrainBatch:
    """Step -> this host's rows of the global batch (keys as in `_collate`; image (b, bucket_h, bucket_w, 3))."""

    def __init__(self, ds, sampler, buckets, seed, rows: range, max_boxes, max_ignore, scale, flip_ratio, with_mask):
        self.ds, self.sampler, self.buckets, self.seed, self.rows = ds, sampler, buckets, seed, rows
        self.max_boxes, self.max_ignore, self.scale, self.flip_ratio = max_boxes, max_ignore, scale, flip_ratio
        self.with_mask = with_mask

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        bucket, indices = self.sampler.batch_of(step)
        indices = indices[self.rows.start : self.rows.stop]
        examples = []
        for row, index in zip(self.rows, indices):
            im = self.ds.images[int(index)]
            flip = example_rng(self.seed, step, row).random() < self.flip_ratio
            gt_masks = image_masks(im) if self.with_mask else None
            examples.append(T.transform(load_image(im.path), im.boxes, im.ignore, flip, self.scale, gt_masks=gt_masks))
        args = (self.max_boxes, self.max_ignore, self.ds, indices, self.with_mask)
        return _collate(examples, self.buckets[bucket], *args)


def image_masks(im) -> np.ndarray:
    """(k, H, W) uint8 masks of an image's k boxes (read with with_mask=True), at its json size."""
    if len(im.segmentations) != len(im.boxes):
        raise ValueError(
            f"image {im.path} (id {im.image_id}) was read without masks: read the dataset with with_mask=True."
        )
    return masks.decode_all(im.segmentations, im.height, im.width)


def _loader_cfg(threads: int, prefetch: int, workers: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(threads=threads, prefetch=prefetch, workers=workers))


def det_train_iterator(
    ds: CocoDetection,
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    buckets=T.DEFAULT_BUCKETS,
    max_boxes: int = 128,
    max_ignore: int = 16,
    scale=T.IMG_SCALE,
    flip_ratio: float = 0.5,
    threads: int = 4,
    prefetch: int = 2,
    workers: int = 0,
    with_mask: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator over this host's train batches; the k-th is global step start_step + k.

    `ds` is read with `read_coco(..., train=True)` (images without boxes skipped, as mmdet does;
    with_mask=True there too for "gt_masks").
    """
    if start_step < 0 or seed < 0:
        raise ValueError(f"seed and start_step must be >= 0, got seed={seed}, start_step={start_step}.")
    rows = _host_rows(global_batch_size, process_index, process_count)
    check_counts(ds, max_boxes, max_ignore)
    sampler = BucketSampler(assign_buckets(ds, buckets, scale), global_batch_size, seed)
    make = DetTrainBatch(ds, sampler, tuple(buckets), seed, rows, max_boxes, max_ignore, scale, flip_ratio, with_mask)
    return _run(grain.MapDataset.range(start_step, _MAX_STEPS).map(make), _loader_cfg(threads, prefetch, workers))


def eval_plan(bucket_ids: np.ndarray, global_batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(batches,) bucket of each eval batch, (batches, B) image indices in order, -1 past a bucket's end."""
    buckets, rows = [], []
    for b in range(int(bucket_ids.max(initial=-1)) + 1):
        group = np.flatnonzero(bucket_ids == b)
        if not len(group):
            continue
        padded = np.concatenate([group, np.full((-len(group)) % global_batch_size, -1)])
        chunks = padded.reshape(-1, global_batch_size)  # (batches of b, B)
        rows.append(chunks)
        buckets += [b] * len(chunks)
    if not buckets:
        return np.zeros((0,), np.int64), np.zeros((0, global_batch_size), np.int64)
    return np.asarray(buckets, np.int64), np.concatenate(rows)


class DetEvalBatch:
    """Eval batch number -> this host's rows (no flip); rows past a bucket's images have valid False."""

    def __init__(self, ds, plan, buckets, rows: range, max_boxes, max_ignore, scale):
        self.ds, self.plan, self.buckets, self.rows = ds, plan, buckets, rows
        self.max_boxes, self.max_ignore, self.scale = max_boxes, max_ignore, scale

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        bucket, indices = int(self.plan[0][k]), self.plan[1][int(k)][self.rows.start : self.rows.stop]
        examples = []
        for index in indices:
            im = self.ds.images[int(index)] if index >= 0 else None
            examples.append(
                None if im is None else T.transform(load_image(im.path), im.boxes, im.ignore, False, self.scale)
            )
        return _collate(examples, self.buckets[bucket], self.max_boxes, self.max_ignore, self.ds, indices)


def det_eval_iterator(
    ds: CocoDetection,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    buckets=T.DEFAULT_BUCKETS,
    max_boxes: int = 128,
    max_ignore: int = 16,
    scale=T.IMG_SCALE,
    threads: int = 4,
    prefetch: int = 2,
    workers: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over every image of `ds` (read with train=False) in bucket-grouped batches."""
    rows = _host_rows(global_batch_size, process_index, process_count)
    check_counts(ds, max_boxes, max_ignore)
    plan = eval_plan(assign_buckets(ds, buckets, scale), global_batch_size)
    make = DetEvalBatch(ds, plan, tuple(buckets), rows, max_boxes, max_ignore, scale)
    return _run(grain.MapDataset.range(len(plan[0])).map(make), _loader_cfg(threads, prefetch, workers))
