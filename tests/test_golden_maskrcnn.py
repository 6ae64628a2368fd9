"""Mask R-CNN BiFormer-S against the official mmdet 2.11 model's outputs in ../shared/golden.

golden/README.md "Detection cases": backbone features, RPN outputs per level, the box head's
outputs fed the reference proposals and the mask logits fed the reference detections within
relative L2 1e-4; anchors equal; proposals: at least 99% of the reference boxes matched one-to-one
(IoU >= 0.99, zero-area boxes within 0.01 px, |score difference| <= 1e-3); detections the same with
labels; masks: at least 99.9% of the matched detections' pixels agree. Everything goes through the
calling convention (create_model, convert.from_torch_state_dict, model.apply and the functions of
`maskrcnn`); the model is compiled once for the file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.golden import rel_l2, require

from biformer_jax import convert, models
from biformer_jax.detection import bbox_overlaps
from biformer_jax.models.detection import maskrcnn

CASE = "maskrcnn_biformer_small"
BAR = 1e-4
nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731


def match(ref_boxes, ref_scores, ref_labels, boxes, scores, labels, score_tol=1e-3):
    """[(reference row, port row)] one-to-one, best IoU first: same label, IoU >= 0.99 (zero-area
    reference boxes: every coordinate within 0.01 px), |score difference| <= score_tol."""
    used = np.zeros(len(boxes), bool)
    iou = np.asarray(bbox_overlaps(jnp.asarray(ref_boxes), jnp.asarray(boxes)))
    pairs = []
    for i, (rb, rs, rl) in enumerate(zip(ref_boxes, ref_scores, ref_labels)):
        ok = (labels == rl) & ~used & (np.abs(scores - rs) <= score_tol)
        zero = (rb[2] - rb[0]) * (rb[3] - rb[1]) == 0
        close = np.all(np.abs(boxes - rb) <= 0.01, axis=1) if zero else iou[i] >= 0.99
        cand = np.flatnonzero(ok & close)
        if len(cand):
            j = cand[np.argmax(iou[i][cand])]
            used[j] = True
            pairs.append((i, j))
    return pairs


@pytest.fixture(scope="module")
def case():
    g = require(CASE)
    model = models.create_model(g.model_name, **g.kwargs)
    variables = convert.from_torch_state_dict(g.state_dict(), model)
    x = jnp.asarray(g.input_nhwc())
    n, h, w, _ = x.shape
    sizes = jnp.asarray([[h, w]] * n, jnp.int32)
    ref_props = jnp.asarray(np.stack([g.data[f"proposals/{i}"][:, :4] for i in range(n)]))
    ref_boxes = jnp.asarray(np.stack([g.data[f"det_bboxes/{i}"][:, :4] for i in range(n)]))
    ref_labels = jnp.asarray(np.stack([g.data[f"det_labels/{i}"] for i in range(n)]).astype(np.int32))

    @jax.jit
    def run(variables, x):
        rpn_cls, rpn_reg, features, fpn = model.apply(variables, x, train=False, return_features=True)
        props = maskrcnn.proposals_from_outputs(model, rpn_cls, rpn_reg, sizes)
        # the heads on the reference's own proposals and detections
        roi_cls, roi_reg = maskrcnn.roi_heads_on_proposals(model, variables, fpn, ref_props)
        logits = maskrcnn.mask_logits(model, variables, fpn, ref_boxes, ref_labels)
        # end to end
        dets = maskrcnn.detections_from_proposals(model, variables, fpn, props, sizes, (h, w))
        return rpn_cls, rpn_reg, features, props, roi_cls, roi_reg, logits, dets

    out = jax.device_get(run(variables, x))
    return g, model, out


def test_features_rpn_and_head_outputs(case):
    g, _, (rpn_cls, rpn_reg, features, _, roi_cls, roi_reg, logits, _) = case
    errors = {f"features/{i}": rel_l2(nchw(f), g.data[f"features/{i}"]) for i, f in enumerate(features)}
    errors.update(
        {f"rpn_cls_scores/{i}": rel_l2(nchw(f), g.data[f"rpn_cls_scores/{i}"]) for i, f in enumerate(rpn_cls)}
    )
    errors.update(
        {f"rpn_bbox_preds/{i}": rel_l2(nchw(f), g.data[f"rpn_bbox_preds/{i}"]) for i, f in enumerate(rpn_reg)}
    )
    errors["roi_cls_scores"] = rel_l2(roi_cls, g.data["roi_cls_scores"])
    errors["roi_bbox_preds"] = rel_l2(roi_reg, g.data["roi_bbox_preds"])
    errors.update({f"mask_logits/{i}": rel_l2(lg, g.data[f"mask_logits/{i}"]) for i, lg in enumerate(logits)})
    print(CASE, {k: f"{v:.2e}" for k, v in errors.items()})
    worst = {k: v for k, v in errors.items() if v > BAR}
    assert not worst, f"relative L2 errors beyond {BAR}: {worst}"


def test_anchors(case):
    g, model, (rpn_cls, *_) = case
    sizes = [c.shape[1:3] for c in rpn_cls]
    for level, a in enumerate(model.anchor_generator.grid_anchors(sizes)):
        np.testing.assert_array_equal(a, g.data[f"anchors/{level}"], err_msg=f"anchors/{level}")


def test_proposals(case):
    g, _, (*_, props, _, _, _, _) = case
    matched = total = 0
    for i in range(props.count.shape[0]):
        k, ref = int(props.count[i]), g.data[f"proposals/{i}"]
        assert k == len(ref), f"image {i}: {k} proposals, reference {len(ref)}"
        zeros = np.zeros(len(ref), np.int32)
        pairs = match(ref[:, :4], ref[:, 4], zeros, props.boxes[i, :k], props.scores[i, :k], zeros[:k])
        matched, total = matched + len(pairs), total + len(ref)
    print(CASE, f"proposals matched {matched}/{total}")
    assert matched >= 0.99 * total


def test_detections_and_masks(case):
    g, _, (*_, dets) = case
    h, w = g.data["input_nchw"].shape[2:]
    matched = total = agree = pixels = 0
    worst_score = 0.0
    for i in range(dets.count.shape[0]):
        k = int(dets.count[i])
        ref, ref_labels = g.data[f"det_bboxes/{i}"], g.data[f"det_labels/{i}"].astype(np.int32)
        assert k == len(ref), f"image {i}: {k} detections, reference {len(ref)}"
        pairs = match(ref[:, :4], ref[:, 4], ref_labels, dets.boxes[i, :k], dets.scores[i, :k], dets.labels[i, :k])
        ref_masks = np.unpackbits(g.data[f"det_masks/{i}"], axis=-1)[..., :w].astype(bool)
        for r, j in pairs:
            worst_score = max(worst_score, abs(float(dets.scores[i, j]) - float(ref[r, 4])))
            agree += int(np.sum(ref_masks[r] == dets.masks[i, j]))
            pixels += h * w
        matched, total = matched + len(pairs), total + len(ref)
    print(
        CASE,
        f"detections matched {matched}/{total}, max |score diff| {worst_score:.1e}, "
        f"mask pixels agreeing {agree}/{pixels} ({agree / max(pixels, 1):.6%})",
    )
    assert matched >= 0.99 * total
    assert agree >= 0.999 * pixels
