"""RetinaNet models (biformer_jax.models.detection): variants, init, norm_eval, converter round trip,
and the test post-processing and losses against dynamic NumPy definitions of mmdet 2.11's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_detection_toolkit import ref_nms, ref_overlaps

from biformer_jax import convert, models
from biformer_jax.detection import DeltaXYWHBBoxCoder
from biformer_jax.models.detection import DETECTION_VARIANTS, anchor_head, retinanet
from biformer_jax.models.detection.retinanet import _frozen_batchnorm
from biformer_jax.models.from_config import CheckpointMismatchError
from biformer_jax.models.layers import BatchNorm
from biformer_jax.models.segmentation import init_backbone_from_classifier


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def micro():
    """The micro model, its variables, an input batch, its eval outputs and `retinanet.detect`'s
    detections (one compile: the two identical forward passes are one computation to XLA)."""
    model = models.create_model("retinanet_biformer_micro")
    x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    outputs, dets = jax.jit(lambda v, x: (model.apply(v, x, train=False), retinanet.detect(model, v, x)))(variables, x)
    return model, variables, x, outputs, dets


def test_variants_build_and_official_parameter_count():
    # golden manifest: the official model's count (shapes only, no compute)
    small = models.create_model("retinanet_biformer_small")
    assert n_params(convert.abstract_variables(small)["params"]) == 35_257_716
    assert set(DETECTION_VARIANTS) >= {
        f"retinanet_{b}_{s}" for b in ("biformer", "debiformer") for s in ("small", "base")
    }
    base = models.create_model("retinanet_biformer_base")
    assert (base.backbone_config["embed_dim"], base.backbone_config["drop_path_rate"]) == ((96, 192, 384, 768), 0.3)
    debi = models.create_model("retinanet_debiformer_small")
    assert (debi.neck_start_level, debi.add_extra_convs, debi.backbone_config["n_win"]) == (0, False, 16)
    # its neck: 4 lateral 1x1 convs (64..512 -> 256) and 4 output 3x3 convs, no extra convs
    laterals, outputs = (64 + 128 + 256 + 512) * 256 + 4 * 256, 4 * (9 * 256 * 256 + 256)
    assert n_params(convert.abstract_variables(debi)["params"]["neck"]) == laterals + outputs
    with pytest.raises(TypeError, match="unknown argument"):
        models.create_model("retinanet_biformer_small", nonsense=1)
    with pytest.raises(ValueError, match="one stride per level"):
        jax.eval_shape(
            models.create_model("retinanet_biformer_micro", num_outs=4).init,
            jax.random.key(0),
            jnp.zeros((1, 64, 64, 3)),
        )


def test_outputs_and_head_init(micro):
    model, variables, x, (cls_scores, bbox_preds), dets = micro
    assert [c.shape for c in cls_scores] == [(2, 8, 12, 45), (2, 4, 6, 45), (2, 2, 3, 45), (2, 1, 2, 45), (2, 1, 1, 45)]
    assert [b.shape[-1] for b in bbox_preds] == [36] * 5
    head = variables["params"]["bbox_head"]
    np.testing.assert_allclose(head["retina_cls"]["bias"], -math.log(99), rtol=1e-6)
    assert 0.005 < float(jnp.std(head["retina_cls"]["kernel"])) < 0.015
    assert float(jnp.abs(head["retina_reg"]["bias"]).max()) == 0.0


def test_frozen_batchnorm_interceptor():
    # norm_eval's mechanism on a bare BatchNorm: train mode then normalises with the running
    # statistics and leaves them alone.
    bn = BatchNorm()
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4)) * 3 + 1
    variables = bn.init(jax.random.key(1), x)
    moving, updates = bn.apply(variables, x, True, mutable=["batch_stats"])
    assert not np.allclose(np.asarray(moving), np.asarray(bn.apply(variables, x, False)))
    with nn.intercept_methods(_frozen_batchnorm):
        frozen, same = bn.apply(variables, x, True, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(frozen), np.asarray(bn.apply(variables, x, False)))
    assert float(same["batch_stats"]["num_batches_tracked"]) == 0


def test_converter_round_trip_and_every_key_checked(micro):
    model, variables, *_ = micro
    sd = convert.to_torch_state_dict(variables)
    assert "neck.fpn_convs.4.conv.weight" in sd and "bbox_head.retina_cls.bias" in sd
    assert sd["neck.lateral_convs.0.conv.weight"].shape == (16, 32, 1, 1)  # backbone level 1 (start_level=1)
    back = convert.from_torch_state_dict(sd, model)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    extra = dict(sd, **{"bbox_head.conv_centerness.weight": np.zeros((1, 16, 3, 3), np.float32)})
    with pytest.raises(CheckpointMismatchError, match="conv_centerness"):
        convert.from_torch_state_dict(extra, model)
    missing = {k: v for k, v in sd.items() if k != "neck.fpn_convs.3.conv.bias"}
    with pytest.raises(CheckpointMismatchError, match="fpn_convs.3.conv.bias"):
        convert.from_torch_state_dict(missing, model)


# ----------------------------------------------------------------------------- dynamic references


def ref_get_bboxes(cls_scores, bbox_preds, anchors, size, nms_pre, score_thr, iou, max_num):
    """mmdet 2.11 AnchorHead._get_bboxes + multiclass_nms for one image, dynamic, NumPy."""
    coder = DeltaXYWHBBoxCoder()
    all_boxes, all_scores = [], []
    for s, d, a in zip(cls_scores, bbox_preds, anchors):
        c = s.shape[-1] // 9
        s = 1 / (1 + np.exp(-s.reshape(-1, c).astype(np.float64)))
        d = d.reshape(-1, 4)
        if s.shape[0] > nms_pre:
            top = np.argsort(-s.max(-1), kind="stable")[:nms_pre]
            s, d, a = s[top], d[top], a[top]
        all_boxes.append(np.asarray(coder.decode(jnp.asarray(a), jnp.asarray(d), max_shape=size)))
        all_scores.append(s.astype(np.float32))
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    cand = [(i, k) for i in range(len(scores)) for k in range(scores.shape[1]) if scores[i, k] > np.float32(score_thr)]
    kept = ref_nms([boxes[i] for i, _ in cand], [scores[i, k] for i, k in cand], [k for _, k in cand], iou)[:max_num]
    return [(boxes[cand[j][0]], scores[cand[j]], cand[j][1]) for j in kept]


def test_get_bboxes_against_dynamic_definition():
    rng = np.random.default_rng(0)
    sizes = [(6, 8), (3, 4), (2, 2)]
    gen = anchor_head.AnchorGenerator(strides=(8, 16, 32))
    cls_scores = [jnp.asarray(rng.normal(-2.5, 1.5, (2, h, w, 9 * 3)).astype(np.float32)) for h, w in sizes]
    bbox_preds = [jnp.asarray(rng.normal(0, 0.3, (2, h, w, 36)).astype(np.float32)) for h, w in sizes]
    image_sizes = np.array([[48, 64], [40, 50]], np.int32)
    cfg = anchor_head.TestConfig(nms_pre=60, score_thr=0.05, iou_threshold=0.5, max_per_img=25)
    dets = jax.jit(lambda c, b: anchor_head.get_bboxes(c, b, gen, DeltaXYWHBBoxCoder(), image_sizes, cfg=cfg))(
        cls_scores, bbox_preds
    )
    anchors = gen.grid_anchors(sizes)
    for i in range(2):
        want = ref_get_bboxes(
            [np.asarray(c[i]) for c in cls_scores],
            [np.asarray(b[i]) for b in bbox_preds],
            anchors,
            tuple(image_sizes[i]),
            60,
            0.05,
            0.5,
            25,
        )
        k = int(dets.count[i])
        assert k == len(want) > 0
        np.testing.assert_array_equal(np.asarray(dets.labels[i, :k]), [w[2] for w in want])
        np.testing.assert_allclose(np.asarray(dets.scores[i, :k]), [w[1] for w in want], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(dets.boxes[i, :k]), [w[0] for w in want], rtol=1e-6, atol=1e-4)
        assert float(np.asarray(dets.boxes[i, :k, 2]).max()) <= image_sizes[i][1]


def ref_losses(cls_scores, bbox_preds, anchors_l, valid_l, gts, num_classes):
    """mmdet 2.11 RetinaNet loss, dynamic: inside anchors only, MaxIoUAssigner(0.5, 0.4, 0), focal + L1."""
    coder = DeltaXYWHBBoxCoder()
    n = cls_scores[0].shape[0]
    anchors = np.concatenate(anchors_l)
    per_image, num_pos = [], []
    for i in range(n):
        inside = np.concatenate(valid_l[i])
        a = anchors[inside]
        boxes, labels = gts[i]
        assigned = np.zeros(len(a), int)
        if len(boxes):
            ov = ref_overlaps(boxes, a)
            best, arg = ov.max(0), ov.argmax(0)
            assigned[:] = -1
            assigned[(best >= 0) & (best < 0.4)] = 0
            assigned[best >= 0.5] = arg[best >= 0.5] + 1
            for g in range(len(boxes)):
                if ov[g].max() >= 0:
                    assigned[ov[g] == ov[g].max()] = g + 1
        lab = np.full(len(anchors), num_classes)
        lw = np.zeros(len(anchors))
        tgt = np.zeros((len(anchors), 4))
        bw = np.zeros((len(anchors), 4))
        idx = np.flatnonzero(inside)
        pos = idx[assigned > 0]
        lab[pos] = labels[assigned[assigned > 0] - 1]
        lw[idx[assigned >= 0]] = 1
        if len(pos):
            tgt[pos] = np.asarray(
                coder.encode(jnp.asarray(anchors[pos]), jnp.asarray(boxes[assigned[assigned > 0] - 1]))
            )
            bw[pos] = 1
        per_image.append((lab, lw, tgt, bw))
        num_pos.append(max(len(pos), 1))
    avg = sum(num_pos)
    out_cls, out_box, start = [], [], 0
    for s, d, a in zip(cls_scores, bbox_preds, anchors_l):
        sl = slice(start, start + len(a))
        start += len(a)
        x = np.concatenate([np.asarray(s[i]).reshape(-1, num_classes) for i in range(n)]).astype(np.float64)
        t = np.concatenate([np.eye(num_classes + 1)[p[0][sl]][:, :num_classes] for p in per_image])
        w = np.concatenate([p[1][sl] for p in per_image])
        p_ = 1 / (1 + np.exp(-x))
        bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
        pt = (1 - p_) * t + p_ * (1 - t)
        focal = bce * (0.25 * t + 0.75 * (1 - t)) * pt**2 * w[:, None]
        out_cls.append(focal.sum() / avg)
        dd = np.concatenate([np.asarray(d[i]).reshape(-1, 4) for i in range(n)])
        tt = np.concatenate([p[2][sl] for p in per_image])
        bb = np.concatenate([p[3][sl] for p in per_image])
        out_box.append((np.abs(dd - tt) * bb).sum() / avg)
    return np.array(out_cls), np.array(out_box), avg


def test_losses_against_dynamic_definition_with_padding_and_an_empty_image(micro):
    model, variables, x, (cls_scores, bbox_preds), dets = micro
    gb = np.zeros((2, 3, 4), np.float32)
    gl = np.zeros((2, 3), np.int32)
    gv = np.zeros((2, 3), bool)
    gb[0, :2], gl[0, :2], gv[0, :2] = [[3, 4, 30, 40], [20, 8, 60, 50]], [1, 4], True  # image 1: no boxes
    pad = np.array([[64, 80], [48, 96]], np.int32)  # smaller than the batch: some anchors invalid
    losses = jax.jit(lambda c, b, gv: retinanet.losses_from_outputs(model, c, b, gb, gl, gv, pad))
    out = losses(cls_scores, bbox_preds, gv)
    gen = model.anchor_generator
    sizes = anchor_head.featmap_sizes(cls_scores)
    valid = [[np.asarray(v) for v in gen.valid_flags(sizes, jnp.asarray(p))] for p in pad]
    assert not all(v.all() for v in valid[0])
    want_cls, want_box, avg = ref_losses(
        cls_scores, bbox_preds, gen.grid_anchors(sizes), valid, [(gb[0, :2], gl[0, :2]), (gb[1, :0], gl[1, :0])], 5
    )
    assert float(out["num_pos"]) == avg
    np.testing.assert_allclose(np.asarray(out["loss_cls_levels"]), want_cls, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(out["loss_bbox_levels"]), want_box, rtol=2e-5, atol=1e-7)
    # no boxes anywhere: the L1 loss is 0, the focal loss averages over one "positive" per image
    none = losses(cls_scores, bbox_preds, np.zeros_like(gv))
    assert float(none["loss_bbox"]) == 0.0 and float(none["num_pos"]) == 2.0 and float(none["loss_cls"]) > 0


def test_entry_points_train_mode_norm_eval_and_gradients(micro):
    model, variables, x, (cls_scores, bbox_preds), dets = micro
    gb = jnp.array([[[3, 4, 30, 40.0]], [[0, 0, 0, 0]]])
    gl, gv = jnp.array([[2], [0]]), jnp.array([[True], [False]])
    # train=True (drop path 0 in the micro variant): with the backbone's BatchNorm frozen (norm_eval)
    # the losses equal those of the eval outputs
    train_loss = jax.jit(
        lambda v: retinanet.loss(model, v, x, gb, gl, gv, train=True, rngs={"drop_path": jax.random.key(0)})
    )(variables)
    from_eval = jax.jit(lambda c, b: retinanet.losses_from_outputs(model, c, b, gb, gl, gv, jnp.array([[64, 96]] * 2)))
    eval_loss = from_eval(cls_scores, bbox_preds)
    for k in ("loss_cls", "loss_bbox"):
        np.testing.assert_allclose(float(train_loss[k]), float(eval_loss[k]), rtol=1e-5)

    def total(c, b):
        out = retinanet.losses_from_outputs(model, c, b, gb, gl, gv, jnp.array([[64, 96]] * 2))
        return out["loss_cls"] + out["loss_bbox"]

    gc, gbox = jax.jit(jax.grad(total, argnums=(0, 1)))(cls_scores, bbox_preds)
    assert all(np.isfinite(np.asarray(g)).all() for g in [*gc, *gbox])
    assert float(jnp.abs(gbox[0]).sum()) > 0 and float(jnp.abs(gc[-1]).sum()) > 0
    assert dets.boxes.shape == (2, 100, 4) and dets.count.shape == (2,) and dets.labels.dtype == jnp.int32
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        retinanet.detect(model, variables, x, image_sizes=jnp.array([64, 96]))


def test_classifier_initialises_the_backbone_and_debiformer_neck_wiring():
    # A classifier's arrays load into the detector's backbone by name (init_from); extra_norms,
    # neck and head keep their initialisation. Shapes only: no compile.
    det = models.create_model("retinanet_biformer_micro")
    det_vars = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), convert.abstract_variables(det))
    cls = models.create_model("biformer_micro", auto_pad=True, num_classes=5)
    cls_vars = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), convert.abstract_variables(cls))
    _, loaded, fresh = init_backbone_from_classifier(det_vars, cls_vars)
    assert loaded and all("/backbone/" in p for p in loaded)
    assert all(not p.split("/")[2].startswith("extra_norms") for p in loaded)
    assert any("/neck/" in p for p in fresh) and any("/bbox_head/" in p for p in fresh)
    # DeBiFormer's configs: FPN from level 0 without extra convs (strides 4-64) under anchors 8-128
    debi_neck = models.create_model("retinanet_biformer_micro", neck_start_level=0, add_extra_convs=False)
    x = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
    shapes = jax.eval_shape(lambda x: debi_neck.init_with_output(jax.random.key(0), x)[0], x)
    assert [c.shape[1:3] for c in shapes[0]] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    gen = debi_neck.anchor_generator
    flags = gen.valid_flags([(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)], jnp.array([64, 96]))
    assert int(flags[0].sum()) == 8 * 12 * 9  # mmdet: stride-8 anchors valid on ceil(64/8) x ceil(96/8) cells
