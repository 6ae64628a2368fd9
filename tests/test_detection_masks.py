"""Instance masks for Mask R-CNN: COCO polygons / RLE read as mmdet reads them (crowd regions
ignored, bad segmentations named or skipped), masks resized and flipped with the image and
bit-packed in batches, the host-side paste against the model's, the synthetic shapes' polygons,
and COCO mask AP on a tiny hand-written json whose AP is known."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from biformer_jax.data.detection import (
    CocoFormatError,
    coco_box_ap,
    coco_mask_ap,
    det_train_iterator,
    read_coco,
    synthetic,
    to_coco_results,
)
from biformer_jax.data.detection import masks as mask_ops
from biformer_jax.data.detection import transforms as T
from biformer_jax.data.segmentation.transforms import resize_nearest
from biformer_jax.models.detection.roi_heads import paste_masks

H, W = 48, 64
CATEGORIES = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]


def rect(x0, y0, x1, y1):
    """(H, W) uint8 mask of the pixels [x0, x1) x [y0, y1), and its pixel-edge polygon."""
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m, [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def ann(i, image_id, cat, mask, seg, **kw):
    ys, xs = np.nonzero(mask)
    bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
    return dict(
        id=i,
        image_id=image_id,
        category_id=cat,
        bbox=bbox,
        area=float(mask.sum()),
        segmentation=seg,
        **{"iscrowd": 0, **kw},
    )


def uncompressed_rle(mask):
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros), as crowd annotations hold."""
    flat = mask.T.reshape(-1)
    runs, value, n = [], 0, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    runs.append(n)
    return {"size": [H, W], "counts": runs}


def write_json(tmp_path, annotations, n_images=1):
    folder = tmp_path / "train2017"
    folder.mkdir(exist_ok=True)
    images = [dict(id=k + 1, file_name=f"{k}.png", width=W, height=H) for k in range(n_images)]
    for im in images:
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(folder / im["file_name"])
    path = tmp_path / "instances_train2017.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=CATEGORIES)))
    return str(path), str(folder)


TRI = np.zeros((H, W), np.uint8)
for _y in range(10, 30):
    TRI[_y, 30 : 30 + (_y - 10) + 1] = 1  # a right triangle, one run per row


def masks_case():
    a, poly_a = rect(2, 3, 20, 13)
    b = TRI
    c, _ = rect(40, 30, 60, 46)
    compressed = mask_utils.encode(np.asfortranarray(c))
    compressed["counts"] = compressed["counts"].decode("ascii")
    crowd, _ = rect(0, 0, 10, 10)
    anns = [
        ann(1, 1, 1, a, [poly_a]),  # polygon
        ann(2, 1, 2, b, uncompressed_rle(b)),  # uncompressed RLE
        ann(3, 1, 1, c, compressed),  # compressed RLE
        ann(4, 1, 1, crowd, uncompressed_rle(crowd), iscrowd=1),  # crowd: an ignore box, no mask
    ]
    return anns, np.stack([a, b, c])


def test_polygons_and_rle_read_as_mmdet_crowd_ignored(tmp_path):
    anns, expected = masks_case()
    ds = read_coco(*write_json(tmp_path, anns), train=True, with_mask=True)
    (im,) = ds.images
    assert len(im.segmentations) == len(im.boxes) == 3 and im.ignore.tolist() == [[0, 0, 10, 10]]
    decoded = mask_ops.decode_all(im.segmentations, im.height, im.width)
    np.testing.assert_array_equal(decoded, expected)
    assert read_coco(*write_json(tmp_path, anns), train=True).images[0].segmentations == ()  # boxes only


@pytest.mark.parametrize(
    "seg, message",
    [
        ([[1.0, 1.0, 9.0, 1.0]], "polygon of 4 coordinates"),  # 2 points (pycocotools would read a box)
        ([[5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], "empty mask"),
        ({"size": [10, 10], "counts": [100]}, "RLE of size"),
        (None, "no segmentation"),
    ],
)
def test_bad_segmentations_named_or_skipped(tmp_path, caplog, seg, message):
    anns, _ = masks_case()
    anns[1] = dict(anns[1], segmentation=seg)
    files = write_json(tmp_path, anns)
    with pytest.raises(
        CocoFormatError, match=rf"annotation 2 of image 0.png in .*instances_train2017.json .*{message}"
    ):
        read_coco(*files, with_mask=True)
    with caplog.at_level(logging.WARNING):
        (im,) = read_coco(*files, with_mask=True, on_bad_box="skip").images
    assert "annotation 2" in caplog.text and "skipped" in caplog.text
    assert len(im.boxes) == len(im.segmentations) == 2 and im.labels.tolist() == [0, 0]


def test_masks_resize_and_flip_with_the_image():
    _, masks = masks_case()
    img = np.zeros((H, W, 3), np.uint8)
    img[masks[1].astype(bool)] = 255  # the triangle painted: its mask must follow the pixels
    boxes = np.float32([[2, 3, 20, 13], [30, 10, 50, 30], [40, 30, 60, 46]])
    for flip in (False, True):
        ex = T.transform(img, boxes, np.zeros((0, 4), np.float32), flip, scale=(100, 75), gt_masks=masks)
        h, w = ex["img_shape"]
        assert (h, w) == (75, 100) and ex["masks"].shape == (3, 75, 100) and ex["masks"].dtype == np.uint8
        want = np.stack([resize_nearest(m, (h, w)) for m in masks])  # cv2 INTER_NEAREST's rule
        np.testing.assert_array_equal(ex["masks"], want[:, :, ::-1] if flip else want)
        for m, box in zip(ex["masks"], ex["boxes"]):  # each mask inside its (resized, flipped) box
            ys, xs = np.nonzero(m)
            assert (
                box[0] - 1 <= xs.min()
                and xs.max() + 1 <= box[2] + 1
                and box[1] - 1 <= ys.min() <= ys.max() < box[3] + 1
            )
        painted = ex["image"][..., 0] > 0  # normalised: the painted pixels are the bright ones
        assert (painted == ex["masks"][1].astype(bool)).mean() > 0.97  # bilinear vs nearest edges only


def test_batches_carry_packed_masks(tmp_path):
    anns, expected = masks_case()
    ds = read_coco(*write_json(tmp_path, anns, n_images=2), train=True, with_mask=True)
    it = det_train_iterator(
        ds,
        seed=0,
        start_step=0,
        global_batch_size=2,
        buckets=((64, 96),),
        max_boxes=4,
        scale=(96, 64),
        threads=1,
        prefetch=0,
        with_mask=True,
        flip_ratio=0.5,
    )
    for _ in range(2):
        batch = next(it)
        assert batch["gt_masks"].shape == (2, 4, 64, 96 // 8) and batch["gt_masks"].dtype == np.uint8
        unpacked = np.asarray(mask_ops.unpack(jnp.asarray(batch["gt_masks"])))
        for row in range(2):
            ex = T.transform(
                np.zeros((H, W, 3), np.uint8),
                ds.images[0].boxes,
                ds.images[0].ignore,
                bool(batch["flip"][row]),
                scale=(96, 64),
                gt_masks=expected,
            )
            np.testing.assert_array_equal(unpacked[row, :3, :64, :85], ex["masks"].astype(bool))  # resized to 64 x 85
            assert not unpacked[row, :, :, 85:].any()  # padded with zeros
            assert not unpacked[row, 3].any() and batch["gt_valid"][row].tolist() == [True] * 3 + [False]
    with pytest.raises(ValueError, match="read without masks"):
        next(
            det_train_iterator(
                read_coco(*write_json(tmp_path, anns), train=True),
                seed=0,
                start_step=0,
                global_batch_size=1,
                buckets=((64, 96),),
                scale=(96, 64),
                with_mask=True,
            )
        )


def test_host_paste_matches_the_models_paste():
    rng = np.random.default_rng(0)
    probs = rng.random((5, 28, 28)).astype(np.float32)
    boxes = np.float32(
        [[3.2, 4.7, 30.1, 20.0], [0, 0, 64, 48], [50.5, 40.2, 70, 60], [10, 10, 10, 30], [-5, 2, 8, 9.5]]
    )
    got = mask_ops.paste(probs, boxes, H, W, 0.5)
    want = np.asarray(paste_masks(jnp.asarray(probs), jnp.asarray(boxes), H, W, 0.5))
    assert got.any() and (got != want).sum() <= 2  # float summation order at the 0.5 boundary only
    rle = mask_ops.encode(got[0])
    assert isinstance(rle["counts"], str) and rle["size"] == [H, W]
    np.testing.assert_array_equal(mask_ops.decode(rle, H, W), got[0])


@pytest.mark.parametrize("kind", synthetic.CLASSES)
def test_synthetic_polygons_are_the_painted_masks(kind):
    for bh, bw in ((3, 5), (17, 9), (24, 56), (56, 31)):
        m = synthetic._shape_mask(kind, bh, bw)
        full = np.zeros((96, 128), np.uint8)
        full[10 : 10 + bh, 20 : 20 + bw] = m
        poly = synthetic.staircase_polygon(m, 20, 10)
        np.testing.assert_array_equal(mask_ops.decode([poly], 96, 128), full)


def test_mask_ap_known_values(tmp_path):
    # two ground truths of one class; detection A is exact, detection B's box is exact but its mask
    # covers 5 of its ground truth's 8 columns (IoU 0.625): box AP 1; mask AP 1 at IoU 0.5-0.6 (3 of
    # the 10 thresholds), elsewhere only A matches: precision 1 up to recall 0.5 -> 51 of 101 points.
    a, poly_a = rect(2, 3, 20, 13)
    b, poly_b = rect(30, 10, 38, 30)
    from pycocotools.coco import COCO

    path, _ = write_json(tmp_path, [ann(1, 1, 1, a, [poly_a]), ann(2, 1, 1, b, [poly_b])])
    gt = COCO(path)
    b_pred, _ = rect(30, 10, 35, 30)
    boxes = np.float32([[[2, 3, 20, 13], [30, 10, 38, 30]]])
    segs = [[mask_ops.encode(a.astype(bool)), mask_ops.encode(b_pred.astype(bool))]]
    results = to_coco_results([1], boxes, np.float32([[0.9, 0.8]]), np.int32([[0, 0]]), np.int32([2]), [1, 2], segs)
    assert coco_box_ap(gt, results)["bbox_mAP"] == pytest.approx(1.0)
    segm = coco_mask_ap(gt, results)
    assert segm["segm_mAP_50"] == pytest.approx(1.0) and segm["segm_mAP_75"] == pytest.approx(51 / 101)
    assert segm["segm_mAP"] == pytest.approx((3 + 7 * 51 / 101) / 10)
    assert "segmentation" in results[0] and "area" not in results[0]  # the caller's dicts untouched
