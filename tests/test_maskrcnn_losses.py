"""Mask R-CNN training losses (maskrcnn.losses_from_outputs) against dynamic NumPy definitions of
mmdet 2.11's (RPNHead.loss, StandardRoIHead bbox and mask losses, BitmapMasks.crop_and_resize),
and the RandomSampler's draws. The loss comparison samples everything (samplers larger than the
candidate sets), so the sampled sets are known without replaying the draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_detection_toolkit import ref_assign
from test_maskrcnn_models import random_variables
from test_roi_align import reference_roi_align

from biformer_jax import models
from biformer_jax.detection.sampler import RandomSampler
from biformer_jax.models.detection import maskrcnn

GT = np.array(
    [[[5, 6, 40, 50], [50, 10, 90, 30], [0, 0, 0, 0]], [[10, 10, 30, 60], [60, 30, 70, 40], [0, 0, 0, 0]]], np.float32
)
LABELS = np.array([[1, 3, 0], [4, 2, 0]], np.int32)
VALID = np.array([[True, True, False], [True, True, False]])


def bce(x, t):
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


@pytest.fixture(scope="module")
def case():
    base = models.create_model("maskrcnn_biformer_micro")
    cfg = maskrcnn.TrainConfig(
        rpn_sampler=RandomSampler(100_000, 0.5, add_gt_as_proposals=False),
        rcnn_sampler=RandomSampler(1100, 1.0),  # >= 1000 proposals + 3 ground-truth slots: all of them
    )
    model = base.clone(train_cfg=cfg)
    x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
    variables = random_variables(model, (64, 96))
    yy, xx = np.mgrid[:64, :96]
    masks = np.stack(
        [np.stack([(xx >= b[0] + 3) & (xx < b[2]) & (yy >= b[1]) & (yy < b[3] - 5) for b in g]) for g in GT]
    )
    sizes = jnp.asarray([[64, 96]] * 2)

    @jax.jit
    def run(variables, key):
        rpn_cls, rpn_reg, _, fpn = model.apply(variables, x, train=False, return_features=True)
        out = maskrcnn.losses_from_outputs(
            model, variables, fpn, rpn_cls, rpn_reg, GT, LABELS, VALID, masks, sizes, key
        )
        props = maskrcnn.rpn.get_proposals(
            rpn_cls, rpn_reg, model.anchor_generator, model.rpn_coder, sizes, cfg.rpn_proposal
        )
        cand = jnp.concatenate([jnp.asarray(GT), props.boxes], axis=1)  # every RoI the sampler may take
        heads = maskrcnn.roi_heads_on_proposals(model, variables, fpn, cand)
        mask_all = model.apply(variables, fpn, cand, method=maskrcnn.MaskRCNN.mask_forward)
        return out, (rpn_cls, rpn_reg), props, cand, heads, mask_all

    return model, masks, jax.device_get(run(variables, jax.random.key(0)))


def test_rpn_losses_against_definition(case):
    model, _, (out, (rpn_cls, rpn_reg), *_) = case
    anchors = np.concatenate(model.anchor_generator.grid_anchors([c.shape[1:3] for c in rpn_cls]))
    cls_sum = box_sum = avg = 0.0
    for i in range(2):
        gts = GT[i][VALID[i]]
        assigned = np.asarray(ref_assign(anchors, gts, 0.7, 0.3, 0.3))
        logits = np.concatenate([np.asarray(c[i], np.float64).reshape(-1) for c in rpn_cls])
        deltas = np.concatenate([np.asarray(r[i], np.float64).reshape(-1, 4) for r in rpn_reg])
        pos, neg = assigned > 0, assigned == 0
        cls_sum += bce(logits, pos)[pos | neg].sum()
        targets = np.asarray(model.rpn_coder.encode(jnp.asarray(anchors[pos]), jnp.asarray(gts[assigned[pos] - 1])))
        box_sum += np.abs(deltas[pos] - targets).sum()
        avg += max(pos.sum(), 1) + max(neg.sum(), 1)
    assert float(out["num_rpn_samples"]) == avg
    np.testing.assert_allclose(float(out["loss_rpn_cls"]), cls_sum / avg, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_rpn_bbox"]), box_sum / avg, rtol=1e-5)


def test_roi_and_mask_losses_against_definition(case):
    model, masks, (out, _, props, cand, (cls_score, bbox_pred), mask_all) = case
    c = model.num_classes
    p = cand.shape[1]
    cls_score, bbox_pred = cls_score.reshape(2, p, -1), bbox_pred.reshape(2, p, c, 4)
    ce_sum = box_sum = mask_sum = 0.0
    sampled = pos_total = 0
    for i in range(2):
        k = int(props.count[i])
        gts, labels = GT[i][VALID[i]], LABELS[i][VALID[i]]
        assigned = np.asarray(ref_assign(props.boxes[i, :k], gts, 0.5, 0.5, 0.5))
        # the ground truth in front (slots 0..G-1 of `cand`, valid ones assigned to themselves), then the proposals
        rows = [g for g in range(3) if VALID[i, g]] + [3 + j for j in range(k)]
        gt_of = {g: g + 1 for g in range(3) if VALID[i, g]} | {3 + j: int(a) for j, a in enumerate(assigned)}
        for r in rows:
            a = gt_of[r]
            if a < 0:
                continue
            sampled += 1
            logits = cls_score[i, r].astype(np.float64)
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            label = labels[a - 1] if a > 0 else c
            ce_sum -= logp[label]
            if a > 0:
                pos_total += 1
                target = np.asarray(model.bbox_coder.encode(jnp.asarray(cand[i, r]), jnp.asarray(gts[a - 1])))
                box_sum += np.abs(bbox_pred[i, r, label] - target).sum()
                gm = masks[i][VALID[i]][a - 1].astype(np.float32)[..., None]
                t = (reference_roi_align(gm, cand[i, r][None], 28, 1.0)[0, ..., 0] >= 0.5).astype(np.float64)
                mask_sum += bce(mask_all[i, r, ..., label].astype(np.float64), t).sum()
    print({k: float(v) for k, v in out.items()})
    assert (float(out["num_rois"]), float(out["num_pos_rois"])) == (sampled, pos_total)
    np.testing.assert_allclose(float(out["loss_cls"]), ce_sum / sampled, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_bbox"]), box_sum / sampled, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss_mask"]), mask_sum / (pos_total * 28 * 28), rtol=1e-5)


def test_random_sampler_draws():
    sampler = RandomSampler(num=16, pos_fraction=0.25)
    gt_inds = jnp.asarray([1, 0, 0, 2, -1, 0, 1, 3, 0, 0, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    valid = jnp.arange(gt_inds.shape[0]) < 24
    draws = set()
    for seed in range(20):
        pos, neg = jax.device_get(sampler.sample(jax.random.key(seed), gt_inds, valid))
        assert pos.sum() == 4 and neg.sum() == 12  # 6 positives -> int(16 * 0.25); 16 - 4 negatives
        assert (np.asarray(gt_inds)[pos] > 0).all() and (np.asarray(gt_inds)[neg] == 0).all()
        assert not (pos | neg)[24:].any()
        draws.add(tuple(np.flatnonzero(pos)))
        order, spos, sneg = jax.device_get(sampler.sampled_order(pos, neg))
        np.testing.assert_array_equal(order[:4], np.flatnonzero(pos))
        np.testing.assert_array_equal(order[4:], np.flatnonzero(neg))
        assert spos[:4].all() and sneg[4:].all()
    assert len(draws) > 5  # the key decides which positives
    # fewer candidates than wanted: all of them, the rest of the slots empty
    pos, neg = sampler.sample(jax.random.key(0), jnp.asarray([1, 0, -1]), jnp.ones(3, bool))
    order, spos, sneg = sampler.sampled_order(pos, neg)
    assert spos.tolist() == [True] + [False] * 15 and sneg.tolist() == [False, True] + [False] * 14
    np.testing.assert_array_equal(
        RandomSampler(8, 0.5, neg_pos_ub=1)
        .sample(jax.random.key(0), jnp.asarray([1, 0, 0, 0]), jnp.ones(4, bool))[1]
        .sum(),
        1,
    )
