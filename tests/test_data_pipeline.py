"""Determinism, resumption, host sharding, repeated augmentation and eval padding of the pipeline."""

import numpy as np
import pytest

from biformer_jax import data
from biformer_jax.data import pipeline, sources


def _full_aug_digits():
    """Digits through the whole ImageNet recipe (RRC, flip, RandAugment, erasing, 3x repeats)."""
    cfg = data.default_config()
    cfg.name = "digits"
    cfg.image_size = 32
    cfg.eval_resize = 36
    cfg.threads = 2
    cfg.prefetch = 2
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_batches_shapes_and_normalisation():
    cfg = _full_aug_digits()
    batch = next(data.train_iterator(cfg, seed=0, start_step=0, global_batch_size=12, process_index=0, process_count=1))
    assert batch["image"].shape == (12, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (12,) and batch["label"].dtype == np.int32
    assert np.isfinite(batch["image"]).all()
    # Normalised with ImageNet statistics: black digit background maps to -mean / std.
    assert batch["image"].min() < -1.5 and batch["image"].max() > 1.0


def test_same_seed_same_batches_other_seed_differs():
    cfg = _full_aug_digits()
    kw = dict(start_step=0, global_batch_size=12, process_index=0, process_count=1)
    a = _take(data.train_iterator(cfg, seed=3, **kw), 2)
    b = _take(data.train_iterator(cfg, seed=3, **kw), 2)
    c = _take(data.train_iterator(cfg, seed=4, **kw), 2)
    for x, y in zip(a, b):
        _assert_same(x, y)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    assert not np.array_equal(a[0]["image"], a[1]["image"])


@pytest.mark.parametrize("image_size,batch", [(32, 12), (8, 300)])  # mid-epoch; over an epoch boundary
def test_restart_reproduces_the_uninterrupted_run(image_size, batch):
    cfg = _full_aug_digits() if image_size == 32 else data.digits_config(image_size)
    kw = dict(seed=1, global_batch_size=batch, process_index=0, process_count=1)  # 1438 // 300 = 4 steps/epoch
    full = _take(data.train_iterator(cfg, start_step=0, **kw), 6)
    resumed = _take(data.train_iterator(cfg, start_step=3, **kw), 3)
    for x, y in zip(full[3:], resumed):
        _assert_same(x, y)


def test_two_hosts_concatenate_to_the_single_host_batch():
    cfg = _full_aug_digits()
    kw = dict(seed=0, start_step=5, global_batch_size=12)
    whole = _take(data.train_iterator(cfg, process_index=0, process_count=1, **kw), 2)
    host0 = _take(data.train_iterator(cfg, process_index=0, process_count=2, **kw), 2)
    host1 = _take(data.train_iterator(cfg, process_index=1, process_count=2, **kw), 2)
    for w, h0, h1 in zip(whole, host0, host1):
        assert h0["image"].shape[0] == 6
        _assert_same(w, {k: np.concatenate([h0[k], h1[k]]) for k in w})


@pytest.mark.slow  # spawns 2 grain worker processes (~10 s of imports on 2 cores)
def test_worker_processes_give_the_same_batches():
    cfg = data.digits_config()
    kw = dict(seed=0, start_step=2, global_batch_size=16, process_index=0, process_count=1)
    inline = _take(data.train_iterator(cfg, **kw), 3)
    cfg.workers = 2
    it = data.train_iterator(cfg, **kw)
    with_workers = _take(it, 3)
    it.close()
    for x, y in zip(inline, with_workers):
        _assert_same(x, y)


def test_epoch_visits_every_record_once_without_repeats():
    sampler = pipeline.TrainSampler(num_examples=103, global_batch_size=10, repeats=1, seed=0)
    assert sampler.steps_per_epoch == 10
    epoch0 = np.concatenate([sampler.records(s) for s in range(10)])
    epoch1 = np.concatenate([sampler.records(s) for s in range(10, 20)])
    assert len(np.unique(epoch0)) == 100 and len(np.unique(epoch1)) == 100  # 3 dropped per epoch
    assert not np.array_equal(epoch0, epoch1)  # reshuffled every epoch
    assert epoch0.min() >= 0 and epoch0.max() < 103


def test_a_shorter_epoch_is_the_samplers_and_the_schedules_alike():
    # config.steps_per_epoch=4: the sampler reshuffles after 4 steps, as the schedule counts epochs.
    sampler = pipeline.TrainSampler(num_examples=103, global_batch_size=10, repeats=1, seed=0, epoch_steps=4)
    assert sampler.steps_per_epoch == data.steps_per_epoch(103, 10, 4) == 4
    whole = pipeline.TrainSampler(num_examples=103, global_batch_size=10, repeats=1, seed=0)
    np.testing.assert_array_equal(sampler.records(3), whole.records(3))  # same first epoch so far
    np.testing.assert_array_equal(sampler.records(4), whole.records(10))  # then epoch 1 starts
    with pytest.raises(ValueError, match="config.steps_per_epoch=11 is more than the 10 batches"):
        data.steps_per_epoch(103, 10, 11)
    # With 3 repeats an epoch's stream holds every record 3 times: up to 30 batches of 10.
    repeated = pipeline.TrainSampler(num_examples=103, global_batch_size=10, repeats=3, seed=0, epoch_steps=30)
    assert repeated.records(29).max() < 103
    with pytest.raises(ValueError, match="more than the 30 batches of 10"):
        data.steps_per_epoch(103, 10, 31, repeats=3)


def test_repeated_augmentation_puts_copies_on_different_devices():
    batch, repeats, devices = 48, 3, 8
    sampler = pipeline.TrainSampler(num_examples=960, global_batch_size=batch, repeats=repeats, seed=0)
    epoch = np.stack([sampler.records(s) for s in range(sampler.steps_per_epoch)])  # (steps, B)
    # Epoch length is kept; each image is seen `repeats` times, so a third of them per epoch.
    counts = np.bincount(epoch.ravel(), minlength=960)
    assert epoch.size == 960 and set(np.unique(counts)) == {0, 3} and (counts == 3).sum() == 320
    block = batch // devices
    for step_records in epoch:
        for record in np.unique(step_records):
            rows = np.flatnonzero(step_records == record)
            assert len(rows) == repeats  # all copies in the same step
            assert len(set(rows // block)) == repeats  # on different devices
    # The copies are augmented differently (the row, not the record, seeds the augmentation).
    cfg = _full_aug_digits()
    it = data.train_iterator(cfg, seed=0, start_step=0, global_batch_size=12, process_index=0, process_count=1)
    batch0 = next(it)
    rec = pipeline.TrainSampler(1438, 12, 3, 0).records(0)
    assert rec[0] == rec[4] == rec[8] and batch0["label"][0] == batch0["label"][4]
    assert not np.array_equal(batch0["image"][0], batch0["image"][4])


def test_eval_pass_pads_the_last_batch_on_every_host():
    cfg = data.digits_config()
    info = data.dataset_info(cfg)
    assert info.num_eval_examples == 359
    one = list(data.eval_iterator(cfg, global_batch_size=100, process_index=0, process_count=1))
    again = list(data.eval_iterator(cfg, global_batch_size=100, process_index=0, process_count=1))
    hosts = [list(data.eval_iterator(cfg, global_batch_size=100, process_index=p, process_count=4)) for p in range(4)]
    assert len(one) == 4 and all(len(h) == 4 for h in hosts)
    for x, y in zip(one, again):
        _assert_same(x, y)
    for b, batch in enumerate(one):
        _assert_same(batch, {k: np.concatenate([h[b][k] for h in hosts]) for k in batch})
    mask = np.concatenate([b["mask"] for b in one])
    assert mask.sum() == 359 and (mask[:359] == 1).all() and (mask[359:] == 0).all()
    labels = np.concatenate([b["label"] for b in one])[:359]
    np.testing.assert_array_equal(labels, sources.load_digits(32, 0.2, 0)["test"].labels)


def test_digits_split_is_fixed_and_stratified():
    split = sources.load_digits(16, 0.2, 0)
    train, test = split["train"], split["test"]
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (16, 16, 3)
    for c in range(10):
        n_train, n_test = (train.labels == c).sum(), (test.labels == c).sum()
        assert n_test == round(0.2 * (n_train + n_test))
    sources.load_digits.cache_clear()
    again = sources.load_digits(16, 0.2, 0)["test"]
    np.testing.assert_array_equal(again.images, test.images)
    other = sources.load_digits(16, 0.2, 1)["test"]
    assert not np.array_equal(other.images, test.images)
    # Gray replicated to RGB, upsampled from 0..16 ink levels to 0..255.
    assert (train.images[..., 0] == train.images[..., 2]).all() and train.images.max() > 200


def test_bad_batch_and_process_arguments_fail_clearly():
    cfg = data.digits_config()
    with pytest.raises(ValueError, match="divisible by process_count"):
        data.train_iterator(cfg, seed=0, start_step=0, global_batch_size=10, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="larger than the train split"):
        data.train_iterator(cfg, seed=0, start_step=0, global_batch_size=4096, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="process_index"):
        data.eval_iterator(cfg, global_batch_size=10, process_index=2, process_count=2)
    cfg.remode = "noise"
    with pytest.raises(ValueError, match="remode"):
        data.dataset_info(cfg)
