"""mmdet 2.11's detection pipeline (resize / flip / normalise / pad) and the bucketed, resumable batches."""

import json

import numpy as np
import pytest
from PIL import Image

from biformer_jax.data.detection import CocoFormatError, read_coco
from biformer_jax.data.detection import pipeline as P
from biformer_jax.data.detection import transforms as T


def mmcv_rescale(w, h, scale=(1333, 800)):
    """mmcv.rescale_size as documented: factor min(long/max, short/min), sides int(x * f + 0.5)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * float(f) + 0.5), int(h * float(f) + 0.5)


@pytest.mark.parametrize(
    "w, h, expected_wh",
    [
        (640, 480, (1067, 800)),  # 4:3, short side limited
        (640, 427, (1199, 800)),  # 3:2
        (640, 360, (1333, 750)),  # 16:9, long side limited
        (427, 640, (800, 1199)),  # portrait
        (333, 1000, (444, 1333)),  # long side limited, 443.999... rounds up
        (1333, 800, (1333, 800)),  # already at scale
        (7, 3, (1333, 571)),  # tiny: 571.28...
        (500, 375, (1067, 800)),
    ],
)
def test_resize_matches_mmcv_rule(w, h, expected_wh):
    assert mmcv_rescale(w, h) == expected_wh  # the rule as written above, on hand-checked sizes
    new_h, new_w = T.resized_size(h, w)
    assert (new_w, new_h) == expected_wh
    # mmdet's factor is per axis (new_w / w, new_h / h), not mmcv's single float
    np.testing.assert_array_equal(T.scale_factor(h, w), np.float32([new_w / w, new_h / h] * 2))


def test_transform_resize_flip_normalise():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    boxes = np.float32([[2, 3, 20, 13], [30, 5, 41, 30]])
    ignore = np.float32([[0, 0, 41, 30]])
    scale = (82, 60)  # factor min(82/41, 60/30) = 2 -> (60, 82)
    a = T.transform(img, boxes, ignore, False, scale)
    assert a["img_shape"] == (60, 82) and a["pad_shape"] == (64, 96) and a["ori_shape"] == (30, 41)
    np.testing.assert_array_equal(a["scale_factor"], [2, 2, 2, 2])
    np.testing.assert_array_equal(a["boxes"], boxes * 2)
    np.testing.assert_array_equal(a["ignore"], ignore * 2)
    assert a["image"].shape == (60, 82, 3) and a["image"].dtype == np.float32
    # normalised with ImageNet's RGB mean/std: a constant image maps to (v - mean) / std
    const = T.transform(np.full((30, 41, 3), 100, np.uint8), boxes, ignore, False, scale)["image"]
    np.testing.assert_allclose(const[0, 0], (100 - np.float32(T.MEAN)) / np.float32(T.STD), rtol=1e-6)
    b = T.transform(img, boxes, ignore, True, scale)
    np.testing.assert_array_equal(b["image"], a["image"][:, ::-1])
    # mmdet's bbox_flip: x1' = W - x2, x2' = W - x1 with W the resized width 82
    np.testing.assert_array_equal(b["boxes"], [[82 - 40, 6, 82 - 4, 26], [82 - 82, 10, 82 - 60, 60]])
    np.testing.assert_array_equal(b["ignore"], [[0, 0, 82, 60]])
    assert b["flip"] and not a["flip"]


def test_boxes_clipped_to_resized_image():
    # a box overhanging by the reader's rounding slack ends at the resized border, as mmdet 2.11 clips
    out = T.transform(
        np.zeros((20, 40, 3), np.uint8), np.float32([[-0.5, 1, 40.5, 20.5]]), np.zeros((0, 4)), False, (80, 40)
    )
    np.testing.assert_array_equal(out["boxes"], [[0, 2, 80, 40]])


def test_bucket_assignment():
    # COCO's common sizes at (1333, 800): 4:3 -> 1088 wide, 3:2 -> 1216, 16:9 -> 1344; portrait mirrored
    sizes = [(480, 640), (427, 640), (360, 640), (640, 480), (640, 427), (640, 360), (500, 500)]
    got = [T.DEFAULT_BUCKETS[T.bucket_of(h, w, T.DEFAULT_BUCKETS)] for h, w in sizes]
    assert got == [(800, 1088), (800, 1216), (800, 1344), (1088, 800), (1216, 800), (1344, 800), (800, 1088)]
    for h, w in sizes + [(1, 2000), (2000, 1), (33, 34)]:
        ph, pw = T.pad_shape(*T.resized_size(h, w))
        bh, bw = T.DEFAULT_BUCKETS[T.bucket_of(h, w, T.DEFAULT_BUCKETS)]
        assert ph % 32 == 0 and pw % 32 == 0 and ph <= bh and pw <= bw
    with pytest.raises(ValueError, match="add a bucket of at least that size"):
        T.bucket_of(480, 640, ((800, 1024),))


# --- batches on a hand-written COCO json ------------------------------------------------------

SCALE = (64, 48)  # tiny images: the rule is the same at any scale
BUCKETS = ((64, 64), (64, 96), (96, 64))
SIZES = {1: (48, 64), 2: (40, 64), 3: (64, 48), 4: (48, 48), 5: (30, 80), 6: (48, 64), 7: (64, 40)}  # id: (h, w)


def write_coco(tmp_path, n_boxes=None, crowd=1):
    folder = tmp_path / "train2017"
    folder.mkdir(exist_ok=True)
    images, anns = [], []
    rng = np.random.default_rng(1)
    for i, (h, w) in SIZES.items():
        name = f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
        images.append(dict(id=i, file_name=name, width=w, height=h))
        for k in range((n_boxes or {}).get(i, 1 + i % 3)):
            anns.append(
                dict(
                    id=len(anns) + 1,
                    image_id=i,
                    category_id=1 + (k % 2),
                    bbox=[1.0 + k, 2.0, 10.0, 12.0],
                    area=120.0,
                    iscrowd=0,
                )
            )
        if i == 1:
            for _ in range(crowd):
                anns.append(
                    dict(
                        id=len(anns) + 1, image_id=i, category_id=1, bbox=[0.0, 0.0, 30.0, 20.0], area=600.0, iscrowd=1
                    )
                )
    cats = [dict(id=1, name="a"), dict(id=2, name="b")]
    path = tmp_path / "instances_train2017.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return str(path), str(folder)


def train_batches(ds, start_step=0, n=4, batch=2, **kw):
    it = P.det_train_iterator(
        ds,
        seed=3,
        start_step=start_step,
        global_batch_size=batch,
        buckets=BUCKETS,
        scale=SCALE,
        max_boxes=5,
        max_ignore=2,
        threads=1,
        **kw,
    )
    return [next(it) for _ in range(n)]


def test_train_batches_buckets_gt_padding_and_resume(tmp_path):
    ds = read_coco(*write_coco(tmp_path), train=True)
    ids = P.assign_buckets(ds, BUCKETS, SCALE)
    # 48x64 -> 48x64 pads 64x64; 40x64 -> 40x64 -> 64x64; 64x48 -> 64x64; 48x48 -> 64x64;
    # 30x80 -> factor min(64/80, 48/30) = 0.8 -> 24x64 -> 32x64; 64x40 -> 64x64: all in (64, 64) but
    # none above it. With (1333, 800)-style shapes, 30x80 at (128, 48) is 48x128 -> bucket (64, 128).
    # train=True skips image 5 (30 px high < 32, as mmdet does); the rest pad to 64x64 at (64, 48)
    assert ids.tolist() == [0] * 6
    ids_wide = P.assign_buckets(ds, ((64, 64), (64, 128), (128, 64)), (128, 48))
    assert ids_wide.tolist() == [0, 1, 0, 0, 0, 2]  # 40x64 -> 48x77 pads 64x96; 64x40 -> 77x48 pads 96x64
    sampler = P.BucketSampler(ids_wide, 2, seed=3)
    assert sampler.steps_per_epoch == 2 + 1 + 1  # ceil(4 / 2) + ceil(1 / 2) + ceil(1 / 2)
    seen = set()
    for s in range(sampler.steps_per_epoch):
        bucket, rows = sampler.batch_of(s)
        assert set(ids_wide[rows]) == {bucket}  # every batch from one bucket
        seen |= set(rows.tolist())
    assert seen == set(range(6))  # an epoch covers every image

    batches = train_batches(ds, n=6)
    for b in batches:
        assert b["image"].shape == (2, 64, 64, 3) and b["gt_bboxes"].shape == (2, 5, 4)
        for row in range(2):
            im = next(im for im in ds.images if im.image_id == b["image_id"][row])
            k = len(im.boxes)
            assert b["gt_valid"][row].tolist() == [True] * k + [False] * (5 - k)
            np.testing.assert_array_equal(b["gt_labels"][row, :k], im.labels)
            np.testing.assert_array_equal(b["gt_bboxes"][row, k:], 0)
            assert b["gt_ignore_valid"][row].sum() == len(im.ignore)
            h, w = b["img_shape"][row]
            assert b["pad_shape"][row].tolist() == [-(-h // 32) * 32, -(-w // 32) * 32]
            assert (b["image"][row, h:] == 0).all() and (b["image"][row, :, w:] == 0).all()  # zero padding
            factor = b["scale_factor"][row]
            boxes = b["gt_bboxes"][row, :k] / factor
            if b["flip"][row]:
                boxes = T.flip_boxes(b["gt_bboxes"][row, :k], int(w)) / factor
            np.testing.assert_allclose(boxes, im.boxes, rtol=1e-5, atol=1e-4)
    flips = np.concatenate([b["flip"] for b in batches])
    assert 0 < flips.sum() < len(flips)  # both ways occur in 12 rows at ratio 0.5
    # deterministic and resumable: starting at step 3 gives steps 3.. of the run from 0
    again = train_batches(ds, start_step=3, n=3)
    for a, b in zip(batches[3:], again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # two hosts each hold their half of the same global batch
    halves = [train_batches(ds, n=1, process_index=p, process_count=2)[0] for p in (0, 1)]
    for key in batches[0]:
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batches[0][key])


def test_eval_batches_keep_sizes_and_pad_rows(tmp_path):
    ds = read_coco(*write_coco(tmp_path))
    it = P.det_eval_iterator(
        ds,
        global_batch_size=3,
        buckets=((64, 64), (64, 128), (128, 64)),
        scale=(128, 48),
        max_boxes=5,
        max_ignore=2,
        threads=1,
    )
    batches = list(it)
    assert [b["image"].shape for b in batches] == [(3, 64, 64, 3)] * 2 + [(3, 64, 128, 3), (3, 128, 64, 3)]
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [True] * 4 + [False] * 2 + [True, True, False] + [True, False, False]
    ids = np.concatenate([b["image_id"] for b in batches])[valid]
    assert sorted(ids.tolist()) == sorted(SIZES)
    for b in batches:
        assert not b["flip"].any()
        for row in np.flatnonzero(b["valid"]):
            h, w = SIZES[int(b["image_id"][row])]
            assert b["ori_shape"][row].tolist() == [h, w]
            new_h, new_w = T.resized_size(h, w, (128, 48))
            assert b["img_shape"][row].tolist() == [new_h, new_w]
            np.testing.assert_array_equal(b["scale_factor"][row], np.float32([new_w / w, new_h / h] * 2))
        assert (b["image"][~b["valid"]] == 0).all()


def test_bad_inputs_surface(tmp_path):
    paths = write_coco(tmp_path, n_boxes={2: 6})
    ds = read_coco(*paths, train=True)
    with pytest.raises(ValueError, match=r"002.png \(id 2\) has 6 boxes, more than max_boxes=5: raise max_boxes"):
        train_batches(ds, n=1)
    ds = read_coco(*write_coco(tmp_path, crowd=3), train=True)
    with pytest.raises(ValueError, match="3 crowd boxes, more than max_ignore=2"):
        train_batches(ds, n=1)
    ds = read_coco(*write_coco(tmp_path), train=True)
    for im in ds.images:  # every image corrupt after the json was read: the first batch names its file
        open(im.path, "wb").write(b"not an image")
    with pytest.raises(CocoFormatError, match=r"train2017/\d{3}.png cannot be decoded"):
        train_batches(ds, n=1)
    with pytest.raises(CocoFormatError, match="not found"):
        read_coco(str(tmp_path / "missing.json"), paths[1])
