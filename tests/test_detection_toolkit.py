"""The detection toolkit (biformer_jax.detection) against plain NumPy / Python definitions.

Each op is jitted with static shapes (padded inputs + masks) and compared with the dynamic
algorithm as mmdet 2.11 writes it, on hand-made cases: ties, low-quality matches, empty inputs,
all-suppressed classes, equal scores.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biformer_jax.detection import (
    AnchorGenerator,
    DeltaXYWHBBoxCoder,
    MaxIoUAssigner,
    batched_nms,
    bbox_overlaps,
    multiclass_nms,
    sigmoid_focal_loss,
)

# ----------------------------------------------------------------------------- references


def ref_overlaps(a, b, mode="iou", eps=1e-6):
    out = np.zeros((len(a), len(b)), np.float64)
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            w = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
            h = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
            inter = w * h
            ap = (p[2] - p[0]) * (p[3] - p[1])
            aq = (q[2] - q[0]) * (q[3] - q[1])
            union = ap + aq - inter if mode == "iou" else ap
            out[i, j] = inter / max(union, eps)
    return out


def ref_assign(anchors, gts, pos=0.5, neg=0.4, min_pos=0.0, assign_all=True, low_quality=True):
    """mmdet's MaxIoUAssigner.assign_wrt_overlaps as written there (loops, no padding)."""
    n = len(anchors)
    if len(gts) == 0:
        return [0] * n
    ov = ref_overlaps(gts, anchors)
    assigned = [-1] * n
    for j in range(n):
        col = ov[:, j]
        best = max(col)
        arg = int(np.argmax(col))
        if 0 <= best < neg:
            assigned[j] = 0
        if best >= pos:
            assigned[j] = arg + 1
    if low_quality:
        for i in range(len(gts)):
            gmax = max(ov[i])
            if gmax >= min_pos:
                if assign_all:
                    for j in range(n):
                        if ov[i, j] == gmax:
                            assigned[j] = i + 1
                else:
                    assigned[int(np.argmax(ov[i]))] = i + 1
    return assigned


def ref_nms(boxes, scores, groups, thr):
    """Greedy NMS per group in descending score order (stable on ties): indices kept, in order."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        ok = True
        for k in kept:
            if groups[k] != groups[i]:
                continue
            if ref_overlaps([boxes[k]], [boxes[i]], eps=0)[0, 0] > thr:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def random_boxes(rng, n, size=100.0, min_wh=2.0, max_wh=40.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- boxes


@pytest.mark.parametrize("mode", ["iou", "iof"])
def test_overlaps_match_definition(mode):
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    b[0] = a[0]  # identical
    b[1] = [a[1, 2], a[1, 3], a[1, 2] + 3, a[1, 3] + 3]  # touching corner: 0
    b[2] = [10, 10, 10, 20]  # zero area
    got = jax.jit(lambda a, b: bbox_overlaps(a, b, mode))(a, b)
    np.testing.assert_allclose(np.asarray(got), ref_overlaps(a, b, mode), rtol=1e-6, atol=1e-7)
    assert bbox_overlaps(jnp.zeros((0, 4)), jnp.asarray(b)).shape == (0, 5)


# ----------------------------------------------------------------------------- anchors


def test_anchors_follow_the_formula_and_order():
    gen = AnchorGenerator()
    sizes = [(4, 5), (2, 3), (1, 2), (1, 1), (1, 1)]
    anchors = gen.grid_anchors(sizes)
    assert [a.shape for a in anchors] == [(h * w * 9, 4) for h, w in sizes]
    for level, (h, w) in enumerate(sizes):
        s = gen.strides[level]
        for y, x, r, k in [(0, 0, 0, 0), (h - 1, w - 1, 2, 2), (h // 2, w // 2, 1, 1), (0, w - 1, 0, 2)]:
            ratio, scale = (0.5, 1.0, 2.0)[r], 4 * 2 ** (k / 3)
            bw, bh = s * scale / math.sqrt(ratio), s * scale * math.sqrt(ratio)
            want = [x * s - bw / 2, y * s - bh / 2, x * s + bw / 2, y * s + bh / 2]
            a = (y * w + x) * 9 + r * 3 + k
            np.testing.assert_allclose(anchors[level][a], want, rtol=1e-6)


def test_valid_flags_cut_at_the_padded_size():
    gen = AnchorGenerator(strides=(8, 16), scales=(1.0,), octave_base_scale=None, ratios=(1.0, 2.0))
    flags = jax.jit(lambda hw: gen.valid_flags([(4, 5), (2, 3)], hw))(jnp.array([17, 24]))
    f0 = np.asarray(flags[0]).reshape(4, 5, 2)
    assert f0[:3, :3].all() and not f0[3:].any() and not f0[:, 3:].any()  # ceil(17/8)=3, ceil(24/8)=3
    f1 = np.asarray(flags[1]).reshape(2, 3, 2)  # ceil(17/16)=2 rows, ceil(24/16)=2 of 3 columns
    assert f1[:, :2].all() and not f1[:, 2].any()
    with pytest.raises(ValueError, match="one stride per level"):
        gen.grid_anchors([(4, 5)])


# ----------------------------------------------------------------------------- coder


def test_coder_round_trip_clipping_and_definition():
    rng = np.random.default_rng(1)
    anchors, gts = random_boxes(rng, 50), random_boxes(rng, 50)
    coder = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2))
    deltas = jax.jit(coder.encode)(anchors, gts)
    px, pw = (anchors[:, 0] + anchors[:, 2]) / 2, anchors[:, 2] - anchors[:, 0]
    gx, gw = (gts[:, 0] + gts[:, 2]) / 2, gts[:, 2] - gts[:, 0]
    np.testing.assert_allclose(np.asarray(deltas[:, 0]), (gx - px) / pw / 0.1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(deltas[:, 2]), np.log(gw / pw) / 0.2, rtol=1e-4, atol=1e-5)
    back = coder.decode(jnp.asarray(anchors), deltas)
    np.testing.assert_allclose(np.asarray(back), gts, rtol=1e-5, atol=1e-3)
    # clipping to the image and the wh ratio clamp
    big = jnp.array([[0.0, 0.0, 0.0, 10.0]])
    out = DeltaXYWHBBoxCoder().decode(jnp.array([[10.0, 10.0, 20.0, 20.0]]), big, max_shape=(30, 25))
    w = 10 * math.exp(abs(math.log(16 / 1000)))  # dh clamped to |log(16/1000)|
    np.testing.assert_allclose(np.asarray(out[0]), [10, max(15 - w / 2, 0), 20, min(15 + w / 2, 30)], rtol=1e-6)
    # class-specific deltas (4k wide) decode each class's box against the same reference
    two = coder.decode(jnp.asarray(anchors[:3]), jnp.concatenate([deltas[:3], jnp.zeros((3, 4))], axis=1))
    np.testing.assert_allclose(np.asarray(two[:, :4]), gts[:3], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(two[:, 4:]), anchors[:3], rtol=1e-6)


# ----------------------------------------------------------------------------- assigner


def _assign_padded(assigner, anchors, gts, pad_to=6):
    g = len(gts)
    padded = np.zeros((pad_to, 4), np.float32)
    padded[:g] = gts
    valid = np.arange(pad_to) < g
    labels = np.arange(pad_to, dtype=np.int32) + 10
    res = jax.jit(assigner.assign)(anchors, padded, valid, labels)
    return np.asarray(res.gt_inds), np.asarray(res.labels)


def test_assigner_hand_made_cases():
    anchors = np.array(
        [
            [0, 0, 10, 10],  # 0: IoU 1 with gt0 and gt1 (a tie: first box wins the max)
            [0, 0, 10, 20],  # 1: IoU 0.5 with gt0/gt1: positive at exactly pos_iou_thr
            [50, 50, 60, 60],  # 2: only low-quality gt2 touches it (best IoU < 0.4)
            [50, 50, 58, 60],  # 3
            [0, 0, 7, 10],  # 4: IoU 0.7
            [200, 200, 210, 210],  # 5: no overlap: negative
            [0, 0, 10, 14],  # 6: IoU 10/14 = 0.714 with gt0/1
            [0, 5, 10, 15],  # 7: IoU 1/3: negative
        ],
        np.float32,
    )
    gts = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [52, 52, 70, 70]], np.float32)
    for kw in [{}, dict(gt_max_assign_all=False), dict(match_low_quality=False), dict(min_pos_iou=0.3)]:
        a = MaxIoUAssigner(**kw)
        got, labels = _assign_padded(a, anchors, gts)
        want = ref_assign(
            anchors, gts, min_pos=a.min_pos_iou, assign_all=a.gt_max_assign_all, low_quality=a.match_low_quality
        )
        assert got.tolist() == want, (kw, got, want)
        assert labels.tolist() == [10 + i - 1 if i > 0 else -1 for i in want]
    got, _ = _assign_padded(MaxIoUAssigner(), anchors, gts)
    assert got[0] == 2  # the later of two tied boxes takes its best anchor in the low-quality pass
    assert got[2] == 3  # gt2's best anchor, below 0.5


def test_assigner_random_against_loops_and_empty():
    rng = np.random.default_rng(2)
    for trial in range(6):
        anchors = random_boxes(rng, 40, size=60)
        gts = random_boxes(rng, int(rng.integers(1, 6)), size=60)
        if trial % 2:
            anchors = np.round(anchors / 4) * 4  # coarse grid: many exact ties
            gts = np.round(gts / 4) * 4
        for kw in [{}, dict(gt_max_assign_all=False)]:
            got, _ = _assign_padded(MaxIoUAssigner(**kw), anchors, gts)
            assert got.tolist() == ref_assign(anchors, gts, assign_all=kw == {})
    got, labels = _assign_padded(MaxIoUAssigner(), random_boxes(rng, 9), np.zeros((0, 4), np.float32))
    assert (got == 0).all() and (labels == -1).all()  # no ground truth: every anchor negative


def test_assigner_ignore_regions():
    anchors = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    gts = np.array([[0, 0, 10, 11]], np.float32)
    ignore = np.array([[18, 18, 29, 29], [0, 0, 0, 0]], np.float32)
    a = MaxIoUAssigner(ignore_iof_thr=0.5)
    res = a.assign(anchors, gts, np.array([True]), None, ignore, np.array([True, False]))
    # anchor 1 is 81% inside the ignore box: IoU -1 everywhere, neither negative nor positive
    assert np.asarray(res.gt_inds).tolist() == [1, -1, 0]


# ----------------------------------------------------------------------------- NMS


@pytest.mark.parametrize("block", [4, 256])
def test_nms_against_greedy(block):
    rng = np.random.default_rng(3)
    centres = random_boxes(rng, 6, size=80, min_wh=10, max_wh=30)
    boxes = np.concatenate([c + rng.normal(0, 2, (12, 4)) for c in centres]).astype(np.float32)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = rng.random(len(boxes)).astype(np.float32)
    scores[5:15] = scores[4]  # equal scores
    groups = rng.integers(0, 3, len(boxes)).astype(np.int32)
    valid = rng.random(len(boxes)) > 0.1
    fn = jax.jit(batched_nms, static_argnames=("iou_threshold", "max_output", "block"))
    for max_out in (3, 20, len(boxes)):
        keep, count = fn(boxes, scores, valid, iou_threshold=0.5, max_output=max_out, groups=groups, block=block)
        idx = np.flatnonzero(valid)
        want = [int(idx[k]) for k in ref_nms(boxes[idx], scores[idx], groups[idx], 0.5)][:max_out]
        assert int(count) == len(want)
        assert np.asarray(keep)[: len(want)].tolist() == want
        assert (np.asarray(keep)[len(want) :] == -1).all()


def test_nms_all_suppressed_empty_and_zero_area():
    same = np.tile(np.array([[5, 5, 20, 20]], np.float32), (7, 1))
    scores = np.linspace(0.9, 0.3, 7).astype(np.float32)
    keep, count = batched_nms(same, scores, np.ones(7, bool), 0.5, 5)
    assert int(count) == 1 and int(keep[0]) == 0  # a class collapses onto its best box
    keep, count = batched_nms(same, scores, np.zeros(7, bool), 0.5, 5)
    assert int(count) == 0 and (np.asarray(keep) == -1).all()
    keep, count = batched_nms(jnp.zeros((0, 4)), jnp.zeros((0,)), jnp.zeros((0,), bool), 0.5, 4)
    assert int(count) == 0 and keep.shape == (4,)
    flat = np.array([[5, 0, 20, 0]] * 3, np.float32)  # zero-area: IoU 0/0 never suppresses
    keep, count = batched_nms(flat, np.array([0.5, 0.5, 0.5], np.float32), np.ones(3, bool), 0.5, 5)
    assert np.asarray(keep)[:3].tolist() == [0, 1, 2]  # equal scores: index order


def test_nms_threshold_compares_like_a_double():
    # torchvision compares the float32 IoU with a C++ double threshold. float32(0.3) rounds up
    # (0.30000001192...), so an IoU of exactly float32(0.3) = 30 / 100 is > 0.3 there: suppressed.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 3, 10]], np.float32)
    assert np.float32(30) / np.float32(100) == np.float32(0.3) and float(np.float32(0.3)) > 0.3
    keep, count = batched_nms(boxes, np.array([1.0, 0.9], np.float32), np.ones(2, bool), 0.3, 2)
    assert int(count) == 1 and int(keep[0]) == 0
    # float32(0.7) rounds down: an IoU of exactly float32(0.7) is not > 0.7, kept.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 7, 10]], np.float32)
    assert np.float32(70) / np.float32(100) == np.float32(0.7) and float(np.float32(0.7)) < 0.7
    keep, count = batched_nms(boxes, np.array([1.0, 0.9], np.float32), np.ones(2, bool), 0.7, 2)
    assert int(count) == 2


def test_multiclass_nms_against_mmdet_definition():
    rng = np.random.default_rng(4)
    boxes = random_boxes(rng, 30, size=50, min_wh=10, max_wh=30)
    scores = rng.random((30, 4)).astype(np.float32) * 0.3
    scores[:, 3] = 0.01  # a class entirely under the threshold
    valid = np.arange(30) < 27
    det = jax.jit(lambda b, s, v: multiclass_nms(b, s, v, 0.05, 0.5, 12, block=8))(boxes, scores, valid)
    # mmdet: every (box, class) above the threshold, box-major, NMS on class-offset boxes, first 12
    cand = [(i, c) for i in range(27) for c in range(4) if scores[i, c] > np.float32(0.05)]
    kept = ref_nms([boxes[i] for i, _ in cand], [scores[i, c] for i, c in cand], [c for _, c in cand], 0.5)[:12]
    assert int(det.count) == len(kept)
    np.testing.assert_array_equal(np.asarray(det.labels)[: len(kept)], [cand[k][1] for k in kept])
    np.testing.assert_array_equal(np.asarray(det.scores)[: len(kept)], [scores[cand[k]] for k in kept])
    np.testing.assert_array_equal(np.asarray(det.boxes)[: len(kept)], [boxes[cand[k][0]] for k in kept])
    none = multiclass_nms(boxes, scores * 0, valid, 0.05, 0.5, 12)
    assert int(none.count) == 0 and (np.asarray(none.labels) == -1).all()


# ----------------------------------------------------------------------------- focal loss


def test_focal_loss_matches_formula():
    rng = np.random.default_rng(5)
    x = rng.normal(0, 3, (6, 5)).astype(np.float32)
    t = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 6)]
    t[0] = 0  # background
    p = 1 / (1 + np.exp(-x.astype(np.float64)))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    pt = (1 - p) * t + p * (1 - t)
    want = bce * (0.25 * t + 0.75 * (1 - t)) * pt**2
    np.testing.assert_allclose(np.asarray(sigmoid_focal_loss(x, t)), want, rtol=1e-5, atol=1e-7)
