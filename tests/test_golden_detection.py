"""RetinaNet BiFormer-S against the official mmdet 2.11 model's outputs in ../shared/golden.

golden/README.md "Detection cases": backbone features, FPN levels and head outputs within relative
L2 1e-4; anchors equal; losses for the manifest's ground truth within relative error 1e-4;
detections: at least 99% of the reference boxes matched one-to-one by a box of the same label with
IoU >= 0.99 (zero-area boxes: every coordinate within 0.01 px) and |score difference| <= 1e-3.
Everything goes through the calling convention (create_model, convert.from_torch_state_dict,
model.apply, retinanet.detect / detections_from_outputs, retinanet.losses_from_outputs); the model
is compiled once for the file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.golden import rel_l2, require

from biformer_jax import convert, models
from biformer_jax.detection import bbox_overlaps
from biformer_jax.models.detection import retinanet

CASE = "retinanet_biformer_small"
BAR = 1e-4
nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731


def match_detections(ref_boxes, ref_labels, boxes, scores, labels, score_tol=1e-3):
    """(matched, largest |score difference| among them, smallest IoU among them): reference (box,
    score) rows that find their own port box: same label, IoU >= 0.99 (or zero-area and within
    0.01 px), |score difference| <= score_tol; one-to-one, best IoU first."""
    used = np.zeros(len(boxes), bool)
    iou = np.asarray(bbox_overlaps(jnp.asarray(ref_boxes[:, :4]), jnp.asarray(boxes))) if len(boxes) else None
    matched, worst_score, worst_iou = 0, 0.0, 1.0
    for i, (rb, rl) in enumerate(zip(ref_boxes, ref_labels)):
        ok = (labels == rl) & ~used & (np.abs(scores - rb[4]) <= score_tol)
        zero = (rb[2] - rb[0]) * (rb[3] - rb[1]) == 0
        close = np.all(np.abs(boxes - rb[:4]) <= 0.01, axis=1) if zero else iou[i] >= 0.99
        cand = np.flatnonzero(ok & close)
        if len(cand):
            j = cand[np.argmax(iou[i][cand])]
            used[j] = True
            matched += 1
            worst_score = max(worst_score, abs(float(scores[j]) - float(rb[4])))
            worst_iou = min(worst_iou, float(iou[i][j]))
    return matched, worst_score, worst_iou


@pytest.fixture(scope="module")
def case():
    g = require(CASE)
    model = models.create_model(g.model_name, **g.kwargs)
    variables = convert.from_torch_state_dict(g.state_dict(), model)
    x = jnp.asarray(g.input_nhwc())
    n, h, w, _ = x.shape
    # ground truth padded to the largest count, with a validity mask (the static-shape convention)
    gts = [(g.data[f"gt_bboxes/{i}"], g.data[f"gt_labels/{i}"]) for i in range(n)]
    gmax = max(len(labels) for _, labels in gts)
    gb = np.zeros((n, gmax, 4), np.float32)
    gl = np.zeros((n, gmax), np.int32)
    gv = np.zeros((n, gmax), bool)
    for i, (boxes, labels) in enumerate(gts):
        gb[i, : len(labels)], gl[i, : len(labels)], gv[i, : len(labels)] = boxes, labels, True
    sizes = jnp.asarray([[h, w]] * n, jnp.int32)  # img_shape = pad_shape = the input size here

    @jax.jit
    def run(variables, x):
        cls_scores, bbox_preds, features, fpn = model.apply(variables, x, train=False, return_features=True)
        dets = retinanet.detections_from_outputs(model, cls_scores, bbox_preds, sizes)
        losses = retinanet.losses_from_outputs(model, cls_scores, bbox_preds, gb, gl, gv, sizes)
        return cls_scores, bbox_preds, features, fpn, dets, losses

    out = jax.device_get(run(variables, x))
    return g, model, variables, x, out


def test_features_fpn_and_head_outputs(case):
    g, _, _, _, (cls_scores, bbox_preds, features, fpn, _, _) = case
    errors = {f"features/{i}": rel_l2(nchw(f), g.data[f"features/{i}"]) for i, f in enumerate(features)}
    errors.update({f"fpn/{i}": rel_l2(nchw(f), g.data[f"fpn/{i}"]) for i, f in enumerate(fpn)})
    errors.update({f"cls_scores/{i}": rel_l2(nchw(f), g.data[f"cls_scores/{i}"]) for i, f in enumerate(cls_scores)})
    errors.update({f"bbox_preds/{i}": rel_l2(nchw(f), g.data[f"bbox_preds/{i}"]) for i, f in enumerate(bbox_preds)})
    print(CASE, {k: f"{v:.2e}" for k, v in errors.items()})
    worst = {k: v for k, v in errors.items() if v > BAR}
    assert not worst, f"relative L2 errors beyond {BAR}: {worst}"


def test_anchors(case):
    g, model, _, _, (cls_scores, *_) = case
    sizes = [c.shape[1:3] for c in cls_scores]
    for level, a in enumerate(model.anchor_generator.grid_anchors(sizes)):
        np.testing.assert_array_equal(a, g.data[f"anchors/{level}"], err_msg=f"anchors/{level}")


def test_detections(case):
    g, _, _, _, (*_, dets, _) = case
    matched = total = 0
    worst_score, worst_iou = 0.0, 1.0
    for i in range(dets.count.shape[0]):
        k = int(dets.count[i])
        ref, ref_labels = g.data[f"det_bboxes/{i}"], g.data[f"det_labels/{i}"]
        m, ws, wi = match_detections(ref, ref_labels, dets.boxes[i, :k], dets.scores[i, :k], dets.labels[i, :k])
        matched, worst_score, worst_iou = matched + m, max(worst_score, ws), min(worst_iou, wi)
        total += len(ref)
        assert k == len(ref), f"image {i}: {k} detections, reference {len(ref)}"
    print(CASE, f"detections matched {matched}/{total}, max |score diff| {worst_score:.1e}, min IoU {worst_iou:.6f}")
    assert matched >= 0.99 * total


def test_losses(case):
    g, _, _, _, (*_, losses) = case
    errors = {}
    for name in ("loss_cls", "loss_bbox"):
        for level, (ours, theirs) in enumerate(zip(np.asarray(losses[f"{name}_levels"]), g.data[f"{name}_levels"])):
            # levels without positives have an L1 loss of exactly 0: absolute error there
            errors[f"{name}/{level}"] = abs(float(ours) - float(theirs)) / (abs(float(theirs)) or 1.0)
        errors[name] = abs(float(losses[name]) - float(g.data[name])) / abs(float(g.data[name]))
    print(CASE, {k: f"{v:.2e}" for k, v in errors.items()})
    worst = {k: v for k, v in errors.items() if v > BAR}
    assert not worst, f"loss errors beyond {BAR}: {worst}"
