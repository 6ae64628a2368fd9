"""The segmentation data side: ADE20K folders, label checks, mmseg transforms, deterministic batches."""

import numpy as np
import pytest
from PIL import Image
from support.segmentation import write_mini_ade

from biformer_jax.data.segmentation import config as seg_config
from biformer_jax.data.segmentation import pipeline as seg_pipeline
from biformer_jax.data.segmentation import prepare as seg_prepare
from biformer_jax.data.segmentation import shapes
from biformer_jax.data.segmentation import sources as seg_sources
from biformer_jax.data.segmentation import transforms as seg_transforms
from biformer_jax.data.sources import BadImageError, DatasetNotPreparedError


def ade_cfg(root, **kw):
    cfg = seg_config.default_seg_config()
    cfg.root = str(root)
    cfg.crop_size = (32, 32)
    cfg.scale = (128, 32)
    cfg.threads = 2
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def mini_ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    return write_mini_ade(
        root, {"training": [(40, 56), (48, 48), (36, 60), (44, 52)], "validation": [(40, 50), (30, 64)]}
    )


def test_reduce_zero_label():
    label = np.array([[0, 1, 2], [150, 255, 0]], np.uint8)
    np.testing.assert_array_equal(seg_sources.reduce_zero_label(label), [[255, 0, 1], [149, 255, 255]])


def test_ade_folder_reads_reduced_labels(mini_ade):
    source, names = seg_sources.open_seg_source(ade_cfg(mini_ade), "train")
    assert len(source) == 4 and len(names) == 150 and names[0] == "wall"
    image, label = source.read([0])[0]
    raw = np.asarray(Image.open(source.label_paths[0]))
    assert image.shape == (40, 56, 3) and label.shape == (40, 56)
    np.testing.assert_array_equal(label, seg_sources.reduce_zero_label(raw))
    info = seg_sources.seg_dataset_info(ade_cfg(mini_ade))
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (4, 2, 150)


def test_missing_annotation_is_named(tmp_path):
    root = write_mini_ade(tmp_path / "ade", {"training": [(32, 32), (32, 32)], "validation": [(32, 32)]})
    next((root / "annotations" / "training").glob("*.png")).unlink()
    seg_sources.scan_split.cache_clear()
    with pytest.raises(seg_sources.SegDataError, match=r"have no annotation.*ADE_train_00000000.png"):
        seg_sources.open_seg_source(ade_cfg(root), "train")


def test_missing_folder_says_how_to_prepare(tmp_path):
    with pytest.raises(DatasetNotPreparedError, match="biformer_jax.data.prepare --name ade20k"):
        seg_sources.open_seg_source(ade_cfg(tmp_path / "nothing"), "train")


def test_label_of_another_size_is_refused(tmp_path):
    root = write_mini_ade(tmp_path / "ade", {"training": [(32, 40)], "validation": [(32, 32)]})
    label_path = next((root / "annotations" / "training").glob("*.png"))
    Image.fromarray(np.ones((30, 40), np.uint8), "L").save(label_path)
    source, _ = seg_sources.open_seg_source(ade_cfg(root), "train")
    with pytest.raises(seg_sources.SegDataError, match=r"label map is 40x30 .* but its image .* is 40x32"):
        source.read([0])


def _ade_with_corrupt_files(tmp_path):
    """3 training examples: 0 good, 1 a JPEG truncated mid-upload, 2 a label PNG that is an HTML page."""
    root = write_mini_ade(tmp_path / "ade", {"training": [(32, 40)] * 3, "validation": [(32, 32)]})
    seg_sources.scan_split.cache_clear()
    image = root / "images" / "training" / "ADE_train_00000001.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
    (root / "annotations" / "training" / "ADE_train_00000002.png").write_text("<html>403 Forbidden</html>")
    return root


@pytest.mark.parametrize(
    "index, bad",
    [(1, "images/training/ADE_train_00000001.jpg"), (2, "annotations/training/ADE_train_00000002.png")],
    ids=["truncated_image", "label_not_an_image"],
)
def test_a_corrupt_file_fails_naming_it(tmp_path, index, bad):
    root = _ade_with_corrupt_files(tmp_path)
    source, _ = seg_sources.open_seg_source(ade_cfg(root), "train")
    assert source.read([0])[0][0].shape == (32, 40, 3)  # the good example reads
    with pytest.raises(BadImageError, match=rf"Cannot decode the .* file {root}/{bad} .*bad_images"):
        source.read([index])


def test_a_corrupt_file_is_skipped_by_choice_with_its_path_logged(tmp_path, caplog):
    root = _ade_with_corrupt_files(tmp_path)
    source, _ = seg_sources.open_seg_source(ade_cfg(root, bad_images="skip"), "train")
    with caplog.at_level("WARNING"):
        (img1, lab1), (img0, lab0) = source.read([1, 0])
    # 1 (truncated) -> 2 (label not an image) -> 0, wrapping around the split.
    np.testing.assert_array_equal(img1, img0)
    np.testing.assert_array_equal(lab1, lab0)
    assert f"{root}/images/training/ADE_train_00000001.jpg" in caplog.text
    assert f"{root}/annotations/training/ADE_train_00000002.png" in caplog.text
    with pytest.raises(ValueError, match="bad_images 'ignore' is not one of"):
        seg_sources.open_seg_source(ade_cfg(root, bad_images="ignore"), "train")


def test_prepare_decodes_every_file_and_names_the_corrupt_ones(tmp_path, caplog):
    root = _ade_with_corrupt_files(tmp_path)
    with pytest.raises(seg_sources.SegDataError, match=r"(?s)2 example\(s\) need fixing.*00000001.jpg.*00000002.png"):
        seg_prepare.prepare_seg_dataset(ade_cfg(root))
    with caplog.at_level("WARNING"):
        info = seg_prepare.prepare_seg_dataset(ade_cfg(root, bad_images="skip"))
    assert info.num_train_examples == 3 and "ADE_train_00000001.jpg" in caplog.text


def test_class_id_beyond_num_classes_is_refused(tmp_path):
    root = write_mini_ade(tmp_path / "ade", {"training": [(32, 32)], "validation": [(32, 32)]})
    label_path = next((root / "annotations" / "training").glob("*.png"))
    label = np.full((32, 32), 3, np.uint8)
    label[0, 0], label[0, 1] = 151, 255  # 151 -> class 150 after reduction: beyond 150 classes; 255 stays ignored
    Image.fromarray(label, "L").save(label_path)
    source, _ = seg_sources.open_seg_source(ade_cfg(root), "train")
    with pytest.raises(seg_sources.SegDataError, match=r"class ids \[151\] .* not in the dataset's 150 classes"):
        source.read([0])


def test_seg_folder_needs_its_class_list(tmp_path):
    root = write_mini_ade(tmp_path / "custom", {"training": [(32, 32)], "validation": [(32, 32)]}, num_classes=3)
    cfg = ade_cfg(root, name="seg_folder", reduce_zero_label=False)
    with pytest.raises(DatasetNotPreparedError, match="classes.txt"):
        seg_sources.open_seg_source(cfg, "train")
    (root / "classes.txt").write_text("a\nb\nc\nd\n")
    source, names = seg_sources.open_seg_source(cfg, "train")
    assert names == ("a", "b", "c", "d") and source.read([0])[0][1].max() <= 3


def test_rescale_and_align_sizes_as_mmcv():
    # 683 x 512 (w x h) at scale (2048, 512): short side 512 -> unchanged; aligned to 32: 704 x 512.
    assert seg_transforms.rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert seg_transforms.test_size(512, 683, (2048, 512), 1.0, 32) == (512, 704)
    # A very long image is limited by the long edge: 100 x 1000 -> factor min(2048/1000, 512/100).
    assert seg_transforms.rescale_size(100, 1000, (2048, 512)) == (205, 2048)
    assert seg_transforms.test_size(375, 500, (2048, 512), 0.5, 32) == (256, 352)  # (256, 341) aligned


def test_random_crop_avoids_one_class_crops():
    label = np.zeros((64, 64), np.uint8)
    label[:, 56:] = 1  # a crop of 16 sees class 1 only near the right border
    img = np.zeros((64, 64, 3), np.uint8)
    shares = []
    for seed in range(20):
        _, crop = seg_transforms.random_crop(img, label, np.random.default_rng(seed), (16, 16), 0.75)
        counts = np.bincount(crop.ravel(), minlength=2)
        shares.append(counts.max() / counts.sum())
    # Without cat_max_ratio most crops are all class 0; with it, most hold both classes.
    assert np.mean(np.array(shares) < 0.75) > 0.5


def test_train_transform_pads_an_image_smaller_than_the_crop():
    cfg = ade_cfg("x", crop_size=(64, 64), scale=(40, 20), ratio_range=(1.0, 1.0), photometric=False)
    img = np.full((20, 30, 3), 200, np.uint8)
    label = np.ones((20, 30), np.uint8)
    out_img, out_label = seg_transforms.SegTrainTransform(cfg)(img, label, np.random.default_rng(0))
    assert out_img.shape == (64, 64, 3) and out_img.dtype == np.float32 and out_label.shape == (64, 64)
    assert (out_label[:20, :30] == 1).all() and (out_label[20:] == 255).all() and (out_label[:, 30:] == 255).all()
    assert (out_img[20:] == 0).all()  # padded after Normalize, with 0


def test_photometric_distortion_is_deterministic_and_bounded():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    a = seg_transforms.photometric_distortion(img, np.random.default_rng(5))
    b = seg_transforms.photometric_distortion(img, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and not np.array_equal(a, img)
    # Bounded as documented: on a grey image (saturation 0, so the hue and saturation steps keep
    # it grey) only brightness +-32 and contrast x [0.5, 1.5] act, in either order, each maybe:
    # every output is grey and within [(100 - 32) * 0.5, (100 + 32) * 1.5] = [34, 198].
    grey = np.full((4, 4, 3), 100, np.uint8)
    outs = np.array([seg_transforms.photometric_distortion(grey, np.random.default_rng(s))[0, 0] for s in range(400)])
    assert (outs == outs[:, :1]).all() and outs.min() >= 34 and outs.max() <= 198
    assert outs.min() < 55 and outs.max() > 170  # the ranges are used, not only their middle
    assert 0.15 < np.mean(outs[:, 0] == 100) < 0.35  # both steps skipped: 1/4 of the draws


def test_train_batches_are_a_function_of_seed_and_step_whatever_the_hosts(mini_ade):
    cfg = ade_cfg(mini_ade)
    one = seg_pipeline.seg_train_iterator(
        cfg, seed=3, start_step=0, global_batch_size=4, process_index=0, process_count=1
    )
    steps = [next(one) for _ in range(3)]
    assert steps[0]["image"].shape == (4, 32, 32, 3) and steps[0]["label"].dtype == np.int32
    resumed = seg_pipeline.seg_train_iterator(
        cfg, seed=3, start_step=2, global_batch_size=4, process_index=1, process_count=2
    )
    half = next(resumed)
    np.testing.assert_array_equal(half["image"], steps[2]["image"][2:])
    np.testing.assert_array_equal(half["label"], steps[2]["label"][2:])
    assert set(np.unique(steps[0]["label"])) <= set(range(150)) | {255}


def test_eval_examples_split_over_hosts(mini_ade):
    cfg, ev = ade_cfg(mini_ade), seg_config.default_eval_config()
    ev.scale, ev.multi_scale_flip = (256, 64), True
    all_ = list(seg_pipeline.seg_eval_iterator(cfg, ev, process_index=0, process_count=1))
    second = list(seg_pipeline.seg_eval_iterator(cfg, ev, process_index=1, process_count=2))
    assert [e["index"] for e in all_] == [0, 1] and [e["index"] for e in second] == [1]
    views = all_[0]["views"]
    assert len(views) == 12 and [v[1] for v in views[:2]] == [False, True]
    assert all(v[2].shape[0] % 32 == 0 and v[2].shape[1] % 32 == 0 for v in views)
    assert all_[0]["label"].shape == (40, 50)


def test_shapes_dataset_is_deterministic_and_held_out():
    a = shapes.make_example(0, "train", 3, 32)
    b = shapes.make_example(0, "train", 3, 32)
    c = shapes.make_example(0, "eval", 3, 32)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    assert set(np.unique(a[1])) <= set(range(len(shapes.CLASS_NAMES)))
