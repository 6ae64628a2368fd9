"""Deterministic, resumable, host-sharded batches: which record and which seed every row gets.

The content of global train step s is a pure function of (cfg, seed, s, global batch size):
  epoch e = s // steps_per_epoch, with steps_per_epoch = num_train // B (the remainder of each
  epoch is dropped, as drop_last does) unless config.steps_per_epoch asks for fewer (the
  learning-rate schedule counts epochs by the same `steps_per_epoch`). Epoch e visits the
  records in a permutation drawn from (seed, e); with repeated augmentation r, the epoch's
  stream is that permutation with every record repeated r times, cut to the epoch length
  (DeiT's RASampler: 1/r of the images, each r times, per epoch). Step s takes stream
  positions [k B, (k + 1) B), k = s mod steps_per_epoch, and lays them out so that the r
  copies of an image sit about B / r rows apart: on different devices whenever the batch is
  split over >= r devices (RASampler sends copies to different ranks). Row j of the step is
  augmented with a Generator seeded by (seed, s, j).
Host p of P yields rows [p B / P, (p + 1) B / P) of every step, so any number of hosts, and a
restart at any step, see exactly the rows the uninterrupted single-host run sees. Records are
read by index: resuming costs nothing (no skipping through a stream).

Host-side work runs in grain: a MapDataset over steps (one element = this host's batch), read
by `threads` threads per process and, with `workers` > 0, in that many processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np
from absl import flags

from biformer_jax.data import sources
from biformer_jax.data.classification import transforms

# Salts that keep the random streams of the epoch order and of the augmentations apart.
_EPOCH_SALT = 0x0E90C
_AUGMENT_SALT = 0xA06


def steps_per_epoch(num_train_examples: int, global_batch_size: int, requested: int = -1, repeats: int = 1) -> int:
    """Steps per epoch: `requested` when > 0, else the whole global batches in the train split.

    The one definition of an epoch, for the sampler and the learning-rate schedule alike (the
    remainder of every epoch is dropped). `requested` (config.steps_per_epoch) must fit in one
    epoch's stream, in which each record stands `repeats` (data.repeated_aug) times.
    """
    whole = num_train_examples // global_batch_size
    if whole < 1:
        raise ValueError(
            f"global_batch_size {global_batch_size} is larger than the train split ({num_train_examples} examples); "
            "lower it."
        )
    if requested <= 0:
        return whole
    most = num_train_examples * repeats // global_batch_size
    if requested > most:
        raise ValueError(
            f"config.steps_per_epoch={requested} is more than the {most} batches of {global_batch_size} that one "
            f"epoch holds ({num_train_examples} examples x {repeats} repeats); lower it, or set -1 for {whole}."
        )
    return requested


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(num_examples) drawn from (seed, epoch).

    Built from the bit generator's raw output (argsort of random 64-bit keys), whose stream is
    stable across numpy releases, unlike Generator.permutation's algorithm.
    """
    bits = np.random.PCG64(np.random.SeedSequence([_EPOCH_SALT, seed, epoch])).random_raw(num_examples)
    return np.argsort(bits, kind="stable")


def repeat_layout(batch: int, repeats: int) -> np.ndarray:
    """Stream position (within the step) of every batch row: (B,) int, a permutation.

    Positions q = r i + c hold copy c of image i; ordering rows by (c, i) puts the copies of
    an image in different blocks of about B / r rows. Identity for repeats == 1.
    """
    q = np.arange(batch)
    return np.lexsort((q // repeats, q % repeats))


class TrainSampler:
    """Maps a global step to the record index of every row of its global batch."""

    def __init__(self, num_examples: int, global_batch_size: int, repeats: int, seed: int, epoch_steps: int = -1):
        self.num_examples, self.batch, self.repeats, self.seed = num_examples, global_batch_size, repeats, seed
        self.steps_per_epoch = steps_per_epoch(num_examples, global_batch_size, epoch_steps, repeats)
        self.layout = repeat_layout(global_batch_size, repeats)
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_perms": {}}

    def _permutation(self, epoch: int) -> np.ndarray:
        # One O(N) permutation per epoch, cached. Threads may straddle an epoch boundary: keep the
        # two newest, and swap the whole dict in one assignment so readers never see a torn state.
        perms = self._perms
        if epoch not in perms:
            kept = {e: perms[e] for e in sorted(perms)[-1:]}
            perms = {**kept, epoch: epoch_permutation(self.num_examples, self.seed, epoch)}
            self._perms = perms
        return perms[epoch]

    def records(self, step: int) -> np.ndarray:
        """(B,) record indices of global step `step`, row by row."""
        epoch, k = divmod(step, self.steps_per_epoch)
        positions = k * self.batch + self.layout  # stream positions within the epoch
        return self._permutation(epoch)[positions // self.repeats]


def example_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The Generator that augments global row `row` of step `step`."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_AUGMENT_SALT, seed, step, row])))


def _host_rows(global_batch_size: int, process_index: int, process_count: int) -> range:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count}).")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be divisible by process_count {process_count} "
            "(every host holds an equal slice of the global batch)."
        )
    local = global_batch_size // process_count
    return range(process_index * local, (process_index + 1) * local)


class TrainBatch:
    """Step -> this host's rows of that step: row r is `example_fn(record, example_rng(seed, step, r))`.

    `example_fn` maps one source record and its generator to {key: array}; the rows are stacked
    by key with `dtypes` ({key: dtype}, the keys a batch holds). Classification: {'image':
    float32 (b, S, S, 3), 'label': int32 (b,)}; segmentation: 'label' int32 (b, h, w); a task
    with more targets (boxes, masks) adds keys.
    """

    def __init__(self, source, example_fn, sampler: TrainSampler, seed: int, rows: range, dtypes: dict):
        self.source, self.example_fn, self.sampler, self.seed, self.rows = source, example_fn, sampler, seed, rows
        self.dtypes = dict(dtypes)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        records = self.sampler.records(step)[self.rows.start : self.rows.stop]
        examples = self.source.read([int(r) for r in records])
        out = [self.example_fn(ex, example_rng(self.seed, step, row)) for row, ex in zip(self.rows, examples)]
        return {key: np.stack([o[key] for o in out]).astype(dtype, copy=False) for key, dtype in self.dtypes.items()}


class ClassifiedExample:
    """(PIL image, int label), rng -> {'image': transform(image, rng), 'label': label}."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, example, rng: np.random.Generator) -> dict:
        img, label = example
        return {"image": self.transform(img, rng), "label": label}


CLASSIFICATION_DTYPES = {"image": np.float32, "label": np.int32}


class EvalBatch:
    """Batch index -> this host's rows: {'image', 'label', 'mask'}; padding rows are zeros with mask 0."""

    def __init__(self, source, transform, global_batch_size: int, rows: range, image_size: int):
        self.source, self.transform, self.batch, self.rows = source, transform, global_batch_size, rows
        self.image_size = image_size

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        positions = [int(index) * self.batch + r for r in self.rows]
        real = [p for p in positions if p < len(self.source)]
        examples = self.source.read(real)
        pad = len(positions) - len(real)
        images = [self.transform(img) for img, _ in examples]
        images += [np.zeros((self.image_size, self.image_size, 3), np.float32)] * pad
        return {
            "image": np.stack(images).astype(np.float32, copy=False),
            "label": np.asarray([label for _, label in examples] + [0] * pad, np.int32),
            "mask": np.asarray([1.0] * len(real) + [0.0] * pad, np.float32),
        }


def _run(dataset: grain.MapDataset, cfg: ml_collections.ConfigDict) -> Iterator[dict[str, np.ndarray]]:
    """Iterates a MapDataset of batches with cfg's threads / prefetch / workers; closes workers at the end."""
    threads = min(cfg.threads, cfg.prefetch)
    it_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=cfg.prefetch))
    if cfg.workers > 0:
        # grain's worker processes read absl flags; outside an absl app nothing has parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers, per_worker_buffer_size=1))
    iterator = iter(it_ds)
    try:
        yield from iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


# Far beyond any run's length; grain datasets need a length, this one is never reached.
_MAX_STEPS = 2**62


def train_iterator(
    cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    epoch_steps: int = -1,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite iterator over this host's train batches; the k-th is global step start_step + k.

    `epoch_steps` (config.steps_per_epoch): steps per epoch when > 0, else `steps_per_epoch`'s.
    """
    return train_batches(
        cfg,
        lambda: sources.open_source(cfg, "train")[0],
        ClassifiedExample(transforms.TrainTransform(cfg)),
        CLASSIFICATION_DTYPES,
        seed=seed,
        start_step=start_step,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
        repeats=cfg.repeated_aug,
        epoch_steps=epoch_steps,
    )


def train_batches(
    cfg: ml_collections.ConfigDict,
    open_source,
    example_fn,
    dtypes: dict,
    *,
    seed: int,
    start_step: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    repeats: int = 1,
    epoch_steps: int = -1,
) -> Iterator[dict[str, np.ndarray]]:
    """Any task's train iterator: `TrainBatch`es of `open_source()` from global step start_step on.

    `example_fn` and `dtypes` as TrainBatch takes them; `repeats` (repeated augmentation) and
    `epoch_steps` as TrainSampler takes them; cfg's threads / prefetch / workers run it.
    """
    rows = _host_rows(global_batch_size, process_index, process_count)
    if start_step < 0 or seed < 0:
        raise ValueError(f"seed and start_step must be >= 0, got seed={seed}, start_step={start_step}.")
    source = open_source()
    sampler = TrainSampler(len(source), global_batch_size, repeats, seed, epoch_steps)
    make_batch = TrainBatch(source, example_fn, sampler, seed, rows, dtypes)
    return _run(grain.MapDataset.range(start_step, _MAX_STEPS).map(make_batch), cfg)


def num_eval_batches(num_eval_examples: int, global_batch_size: int) -> int:
    """Batches in one eval pass (the last one padded), the same on every host."""
    return math.ceil(num_eval_examples / global_batch_size)


def eval_iterator(
    cfg: ml_collections.ConfigDict, *, global_batch_size: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over the eval split, in record order, this host's rows of each batch."""
    rows = _host_rows(global_batch_size, process_index, process_count)
    source, _ = sources.open_source(cfg, "eval")
    make_batch = EvalBatch(source, transforms.EvalTransform(cfg), global_batch_size, rows, cfg.image_size)
    return _run(grain.MapDataset.range(num_eval_batches(len(source), global_batch_size)).map(make_batch), cfg)
