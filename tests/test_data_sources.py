"""Sources: ImageFolder trees, TFDS imagenet2012 built from a miniature manual_dir, bad input."""

import numpy as np
import pytest
from PIL import Image
from support import imagenet_fixture

from biformer_jax import data
from biformer_jax.data import sources


def _imagenet_cfg(data_dir):
    cfg = data.default_config()
    cfg.data_dir = str(data_dir)
    cfg.image_size, cfg.eval_resize = 32, 36
    cfg.threads = cfg.prefetch = 2
    return cfg


def test_imagenet2012_end_to_end(mini_imagenet):
    cfg = _imagenet_cfg(mini_imagenet)
    info = data.dataset_info(cfg)
    assert info == data.DatasetInfo(num_classes=1000, num_train_examples=24, num_eval_examples=3, image_size=32)
    kw = dict(seed=0, global_batch_size=6, process_index=0, process_count=1)
    batches = [next(data.train_iterator(cfg, start_step=s, **kw)) for s in range(2)]
    for b in batches:
        assert b["image"].shape == (6, 32, 32, 3) and np.isfinite(b["image"]).all()
        # 3 repeats of 2 images per step: labels of the first 3 classes, one of them at least 3 times.
        assert set(b["label"]) <= {0, 1, 2} and np.bincount(b["label"], minlength=3).max() >= 3
    # The full recipe (RandAugment, erasing, 3 repeats) ran: the copies differ.
    assert not np.array_equal(batches[0]["image"][0], batches[0]["image"][2])
    resumed = next(data.train_iterator(cfg, start_step=1, **kw))
    np.testing.assert_array_equal(resumed["image"], batches[1]["image"])
    evals = list(data.eval_iterator(cfg, global_batch_size=2, process_index=0, process_count=1))
    assert [e["mask"].tolist() for e in evals] == [[1, 1], [1, 0]]
    # Validation labels are tfds' official ones for ILSVRC2012_val_00000001..3 (record order is tfds').
    wnids = imagenet_fixture.imagenet_wnids()
    expected = sorted(wnids.index(w) for w in imagenet_fixture.imagenet_validation_labels(3))
    assert sorted(np.concatenate([e["label"] for e in evals])[:3].tolist()) == expected


def test_missing_imagenet_says_how_to_prepare_it(tmp_path):
    cfg = _imagenet_cfg(tmp_path / "empty")
    with pytest.raises(data.DatasetNotPreparedError) as e:
        data.dataset_info(cfg)
    message = str(e.value)
    for needed in (
        "ILSVRC2012_img_train.tar",
        "ILSVRC2012_img_val.tar",
        "--manual_dir",
        "biformer_jax.data.prepare",
        "data.data_dir",
        str(tmp_path / "empty"),
    ):
        assert needed in message
    with pytest.raises(data.DatasetNotPreparedError, match="ILSVRC2012_img_train.tar"):
        data.prepare_dataset(cfg, manual_dir=str(tmp_path))  # no tars there


def test_missing_tfds_dataset_and_unknown_name(tmp_path):
    cfg = data.default_config()
    cfg.name, cfg.data_dir = "cifar10", str(tmp_path)
    with pytest.raises(data.DatasetNotPreparedError, match="prepare --name cifar10"):
        data.dataset_info(cfg)
    cfg.name = "imagenet2013"
    with pytest.raises(ValueError, match="Unknown dataset name 'imagenet2013'.*imagenet2012"):
        data.dataset_info(cfg)
    cfg.name = "digitz"
    with pytest.raises(ValueError, match="digits"):
        data.train_iterator(cfg, seed=0, start_step=0, global_batch_size=2, process_index=0, process_count=1)


def _write_folder(root):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for name in ["cat", "dog", "emu"]:
            d = root / split / name
            d.mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (20 + 4 * k, 30, 3), dtype=np.uint8)
                if k == 0:
                    Image.fromarray(pixels[..., 0], "L").save(d / f"{k}.png")  # grayscale
                elif k == 1:
                    Image.fromarray(np.dstack([pixels, pixels[..., :1]]), "RGBA").save(d / f"{k}.PNG")
                else:
                    Image.fromarray(pixels, "RGB").save(d / f"{k}.jpg")
            (d / "notes.txt").write_text("not an image")


def test_folder_source_end_to_end(tmp_path):
    _write_folder(tmp_path)
    cfg = data.default_config()
    cfg.name, cfg.folder = "folder", str(tmp_path)
    cfg.image_size, cfg.eval_resize, cfg.threads, cfg.prefetch = 16, 18, 2, 2
    assert data.dataset_info(cfg) == data.DatasetInfo(3, 12, 6, 16)
    batch = next(data.train_iterator(cfg, seed=0, start_step=0, global_batch_size=6, process_index=0, process_count=1))
    assert batch["image"].shape == (6, 16, 16, 3)
    evals = list(data.eval_iterator(cfg, global_batch_size=4, process_index=0, process_count=1))
    labels = np.concatenate([e["label"] for e in evals])[:6]
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]  # sorted class folders, sorted files
    assert np.concatenate([e["mask"] for e in evals]).tolist() == [1] * 6 + [0] * 2


def test_prepare_command_checks_a_folder(tmp_path, capsys):
    from biformer_jax.data import prepare

    _write_folder(tmp_path)
    prepare.main(["--name", "folder", "--folder", str(tmp_path)])
    out = capsys.readouterr().out
    assert "folder: ready" in out and "num_train_examples=12" in out and "num_eval_examples=6" in out


def test_folder_errors_show_the_layout(tmp_path):
    cfg = data.default_config()
    cfg.name, cfg.folder = "folder", str(tmp_path / "nowhere")
    with pytest.raises(data.DatasetNotPreparedError, match=r"(?s)ImageFolder layout.*/train/<class name>"):
        data.dataset_info(cfg)
    cfg.folder = ""
    with pytest.raises(ValueError, match="folder=<root>"):
        data.dataset_info(cfg)
    _write_folder(tmp_path)
    (tmp_path / "val" / "yak").mkdir()
    cfg.folder = str(tmp_path)
    with pytest.raises(ValueError, match="absent from the train split.*yak"):
        data.dataset_info(cfg)


def test_tfrecord_dataset_needs_conversion(mini_imagenet, monkeypatch):
    """A TFDS dataset prepared without a random-access format gets the conversion command."""
    from tensorflow_datasets.core import file_adapters

    builder = sources._prepared_tfds.__wrapped__("imagenet2012", str(mini_imagenet))
    monkeypatch.setattr(type(builder.info), "available_file_formats", lambda self: [file_adapters.FileFormat.TFRECORD])
    with pytest.raises(sources.NoRandomAccessError, match="tfds convert_format"):
        sources._tfds_check_random_access(builder)
