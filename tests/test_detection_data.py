"""COCO reading (mmdet 2.11's rules) and COCO box AP on a tiny hand-written json whose AP is known."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from biformer_jax.data.detection import (
    CocoFormatError,
    coco_box_ap,
    load_image,
    read_coco,
    to_coco_results,
    write_results,
)

CATEGORIES = [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}, {"id": 7, "name": "train"}]


def ann(i, image_id, cat, bbox, **kw):
    return {
        "id": i,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": 0,
        **kw,
    }


def write_coco(tmp_path, annotations, images=None, files=True):
    images = images or [
        dict(id=1, file_name="a.jpg", width=64, height=48),
        dict(id=2, file_name="b.jpg", width=40, height=40),
        dict(id=5, file_name="c.jpg", width=50, height=20),  # no annotation; below 32 px high
    ]
    folder = tmp_path / "val2017"
    folder.mkdir(exist_ok=True)
    if files:
        for im in images:
            Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(folder / im["file_name"])
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=CATEGORIES)))
    return str(path), str(folder)


ANNS = [
    ann(1, 1, 1, [2.0, 3.0, 20.0, 10.0]),
    ann(2, 1, 3, [30.0, 5.0, 10.0, 30.0]),
    ann(3, 1, 1, [0.0, 0.0, 64.0, 48.0], iscrowd=1),  # crowd: an ignore box
    ann(4, 2, 1, [5.0, 5.0, 10.0, 10.0]),
    ann(5, 2, 7, [10.0, 10.0, 0.5, 20.0]),  # narrower than 1 px: dropped as mmdet does
    ann(6, 2, 3, [1.0, 1.0, 30.0, 30.0], ignore=True),  # ignore flag: dropped
]


def test_reading_follows_mmdet(tmp_path):
    ds = read_coco(*write_coco(tmp_path, ANNS))
    assert ds.cat_ids == [1, 3, 7] and ds.class_names == ["person", "car", "train"]
    assert [im.image_id for im in ds.images] == [1, 2, 5]
    a, b, c = ds.images
    np.testing.assert_array_equal(a.boxes, [[2, 3, 22, 13], [30, 5, 40, 35]])
    assert a.labels.tolist() == [0, 1] and a.ignore.tolist() == [[0, 0, 64, 48]]
    assert b.labels.tolist() == [0] and c.boxes.shape == (0, 4)
    assert load_image(a.path).shape == (48, 64, 3)
    train = read_coco(*write_coco(tmp_path, ANNS), train=True)
    assert [im.image_id for im in train.images] == [1, 2]  # image 5: no annotation (and too small)


def test_box_ap_known_values(tmp_path):
    # pycocotools evaluates the json as it is (its own crowd rule; no 'ignore' flag, no 1-px rule),
    # so the AP case keeps to boxes both read alike: person x2 + a crowd region, car x1
    ds = read_coco(*write_coco(tmp_path, ANNS[:4]))
    ids = [1, 2, 5]
    # exact boxes for all three ground truths: AP 1
    boxes = np.zeros((3, 4, 4), np.float32)
    scores = np.zeros((3, 4), np.float32)
    labels = np.zeros((3, 4), np.int32)
    boxes[0, :2], scores[0, :2], labels[0, :2] = [[2, 3, 22, 13], [30, 5, 40, 35]], [0.9, 0.8], [0, 1]
    boxes[1, 0], scores[1, 0], labels[1, 0] = [5, 5, 15, 15], 0.7, 0
    perfect = coco_box_ap(ds.coco, to_coco_results(ids, boxes, scores, labels, [2, 1, 0], ds.cat_ids))
    assert perfect["bbox_mAP"] == pytest.approx(1.0) and perfect["bbox_mAP_50"] == pytest.approx(1.0)
    # person: one of its two boxes found (recall 0.5 at precision 1: 51 of COCO's 101 recall points),
    # car found exactly: mean over the two categories with ground truth
    half = coco_box_ap(ds.coco, to_coco_results(ids, boxes, scores, labels, [2, 0, 0], ds.cat_ids))
    assert half["bbox_mAP"] == pytest.approx((51 / 101 + 1) / 2, abs=1e-6)
    assert coco_box_ap(ds.coco, [])["bbox_mAP"] == 0.0
    results = to_coco_results(ids, boxes, scores, labels, [2, 1, 0], ds.cat_ids)
    assert results[1] == {"image_id": 1, "bbox": [30.0, 5.0, 10.0, 30.0], "score": pytest.approx(0.8), "category_id": 3}
    write_results(tmp_path / "detections.json", results)
    assert json.loads((tmp_path / "detections.json").read_text())[0]["category_id"] == 1


def test_bad_input_is_named(tmp_path, caplog):
    with pytest.raises(CocoFormatError, match="missing.json not found"):
        read_coco(str(tmp_path / "missing.json"), str(tmp_path))
    ann_file, folder = write_coco(tmp_path, ANNS)
    os.remove(os.path.join(folder, "b.jpg"))
    with pytest.raises(CocoFormatError, match=r"names image b\.jpg .* no such file"):
        read_coco(ann_file, folder)
    outside = [*ANNS[:2], ann(9, 1, 1, [50.0, 40.0, 30.0, 30.0])]
    ann_file, folder = write_coco(tmp_path, outside)
    with pytest.raises(CocoFormatError, match=r"annotation 9 of image a\.jpg .* outside the 64x48 image"):
        read_coco(ann_file, folder)
    ds = read_coco(ann_file, folder, on_bad_box="skip")
    assert len(ds.images[0].boxes) == 2 and "skipped" in caplog.text
    (tmp_path / "val2017" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CocoFormatError, match=r"a\.jpg cannot be decoded"):
        load_image(str(tmp_path / "val2017" / "a.jpg"))
