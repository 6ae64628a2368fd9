"""Mask R-CNN models (biformer_jax.models.detection.maskrcnn): variants, converter keys, the RPN's
proposals against a dynamic definition, front padding and the y2 == 0 switch, the transposed conv
and mask pasting against PyTorch (mmdet's `_do_paste_mask` on the CPU path)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import required
from test_detection_toolkit import ref_nms

from biformer_jax import convert, models
from biformer_jax.models.detection import MASKRCNN_VARIANTS, maskrcnn
from biformer_jax.models.detection.roi_heads import ConvTranspose2x2, paste_masks
from biformer_jax.models.detection.rpn_head import Proposals
from biformer_jax.models.from_config import CheckpointMismatchError


def n_params(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def random_variables(model, image_size):
    """Variables of `model`'s shapes filled from a seeded NumPy generator (tracing only: compiling
    `model.init` takes longer than the rest of the file)."""
    rng = np.random.default_rng(0)

    def leaf(path, spec):
        name, shape = path[-1], spec.shape
        if name == "num_batches_tracked":
            return np.zeros(shape, spec.dtype)
        if name == "var":
            return (0.5 + rng.random(shape)).astype(spec.dtype)
        if name == "scale":
            return (1 + 0.1 * rng.standard_normal(shape)).astype(spec.dtype)
        if len(shape) < 2:
            return (0.1 * rng.standard_normal(shape)).astype(spec.dtype)
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(spec.dtype)

    abstract = convert.abstract_variables(model, image_size)
    return jax.tree_util.tree_map_with_path(lambda p, s: leaf(tuple(k.key for k in p), s), abstract)


@pytest.fixture(scope="module")
def micro():
    model = models.create_model("maskrcnn_biformer_micro")
    x = jax.random.normal(jax.random.key(1), (2, 64, 96, 3))
    variables = random_variables(model, (64, 96))

    @jax.jit
    def run(v, x):
        rpn_cls, rpn_reg, _, fpn = model.apply(v, x, train=False, return_features=True)
        sizes = jnp.asarray([x.shape[1:3]] * x.shape[0])
        props = maskrcnn.proposals_from_outputs(model, rpn_cls, rpn_reg, sizes)
        return (rpn_cls, rpn_reg), props, maskrcnn.detections_from_proposals(model, v, fpn, props, sizes, x.shape[1:3])

    return model, variables, x, *run(variables, x)


def test_variants_and_official_parameter_count():
    small = models.create_model("maskrcnn_biformer_small")
    assert n_params(convert.abstract_variables(small)["params"]) == 45_175_152  # golden manifest
    assert set(MASKRCNN_VARIANTS) == {
        f"maskrcnn_{b}_{s}" for b in ("biformer", "debiformer") for s in ("small", "base")
    } | {"maskrcnn_biformer_micro"}
    assert all(name in models.list_models() for name in MASKRCNN_VARIANTS)
    debi = models.create_model("maskrcnn_debiformer_base", num_classes=3)
    assert (debi.backbone_config["n_win"], debi.backbone_config["drop_path_rate"], debi.num_classes) == (32, 0.3, 3)
    small = models.create_model("maskrcnn_debiformer_small")
    assert (small.backbone_config["n_win"], small.backbone_config["drop_path_rate"]) == (16, 0.2)
    with pytest.raises(TypeError, match="unknown argument"):
        models.create_model("maskrcnn_biformer_small", nonsense=1)


def test_converter_keys_round_trip_and_every_key_checked(micro):
    model, variables, *_ = micro
    sd = convert.to_torch_state_dict(variables)
    heads = sorted(k for k in sd if not k.startswith(("backbone.", "neck.")))
    assert heads == sorted(
        [f"rpn_head.{m}.{p}" for m in ("rpn_conv", "rpn_cls", "rpn_reg") for p in ("weight", "bias")]
        + [
            f"roi_head.bbox_head.{m}.{p}"
            for m in ("shared_fcs.0", "shared_fcs.1", "fc_cls", "fc_reg")
            for p in ("weight", "bias")
        ]
        + [
            f"roi_head.mask_head.{m}.{p}"
            for m in ("convs.0.conv", "upsample", "conv_logits")
            for p in ("weight", "bias")
        ]
    )
    # PyTorch layouts: Linear (out, in), ConvTranspose2d (in, out, 2, 2)
    assert sd["roi_head.bbox_head.shared_fcs.0.weight"].shape == (32, 16 * 7 * 7)
    assert sd["roi_head.bbox_head.fc_reg.weight"].shape == (5 * 4, 32)
    assert sd["rpn_head.rpn_reg.weight"].shape == (12, 16, 1, 1)
    back = convert.from_torch_state_dict(sd, model)
    jax.tree.map(np.testing.assert_array_equal, back["params"], jax.device_get(variables["params"]))
    for broken in (
        {k: v for k, v in sd.items() if k != "roi_head.mask_head.upsample.bias"},
        {**sd, "roi_head.mask_head.convs.1.conv.weight": sd["roi_head.mask_head.convs.0.conv.weight"]},
        {**sd, "rpn_head.rpn_cls.weight": np.zeros((4, 16, 1, 1), np.float32)},
    ):
        with pytest.raises(CheckpointMismatchError):
            convert.from_torch_state_dict(broken, model)


def test_proposals_against_dynamic_definition(micro):
    model, _, x, (rpn_cls, rpn_reg), props, dets = micro
    cfg = model.rpn_test_cfg
    anchors = model.anchor_generator.grid_anchors([c.shape[1:3] for c in rpn_cls])
    h, w = x.shape[1:3]
    for i in range(x.shape[0]):
        boxes, scores, levels = [], [], []
        for level, (c, r, a) in enumerate(zip(rpn_cls, rpn_reg, anchors)):
            s = np.asarray(jax.nn.sigmoid(c[i].reshape(-1)))  # float32, as the port and mmdet
            order = np.argsort(-s, kind="stable")[: cfg.nms_pre]
            d = np.asarray(r[i]).reshape(-1, 4)[order]
            boxes.append(np.asarray(model.rpn_coder.decode(jnp.asarray(a[order]), jnp.asarray(d), (h, w))))
            scores.append(s[order])
            levels += [level] * len(order)
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        kept = ref_nms(list(boxes), list(scores), levels, cfg.iou_threshold)[: cfg.max_per_img]
        k = int(props.count[i])
        assert k == len(kept)
        np.testing.assert_allclose(props.boxes[i, :k], boxes[kept], atol=1e-4)
        np.testing.assert_allclose(props.scores[i, :k], scores[kept], rtol=1e-5)
        assert not np.asarray(props.boxes[i, k:]).any()
    # detections: shapes, padding, masks only within count
    assert dets.boxes.shape == (2, 10, 4) and dets.masks.shape == (2, 10, 64, 96)
    assert dets.mask_logits.shape == (2, 10, 28, 28)
    for i in range(2):
        k = int(dets.count[i])
        assert (np.asarray(dets.labels[i, k:]) == -1).all() and not np.asarray(dets.masks[i, k:]).any()


def test_smaller_images_in_a_padded_batch(micro):
    # image 1 is 40 x 56 within the 64 x 96 batch: its boxes are clipped to it, its masks stay inside it
    model, variables, x, *_ = micro
    dets = jax.jit(lambda v, x: maskrcnn.detect(model, v, x, jnp.asarray([[64, 96], [40, 56]])))(variables, x)
    k = int(dets.count[1])
    assert k > 0
    boxes = np.asarray(dets.boxes[1, :k])
    assert (boxes[:, 0::2] <= 56).all() and (boxes[:, 1::2] <= 40).all() and (boxes >= 0).all()
    masks = np.asarray(dets.masks[1])
    assert not masks[:, 40:].any() and not masks[:, :, 56:].any()
    assert np.asarray(dets.masks[0]).any() and masks.any()


def test_front_padding_and_the_y2_zero_switch(micro):
    model = micro[0]
    boxes = jnp.asarray(
        [[[1, 2, 30, 40], [5, 0, 20, 0], [0, 0, 0, 0]], [[3, 3, 9, 9], [0, 0, 0, 0], [0, 0, 0, 0]]], jnp.float32
    )
    props = Proposals(boxes, jnp.ones((2, 3)), jnp.asarray([2, 1]))
    rois, valid = maskrcnn.front_pad(props)
    np.testing.assert_array_equal(rois[0], [[0, 0, 0, 0], [1, 2, 30, 40], [5, 0, 20, 0]])
    np.testing.assert_array_equal(rois[1], [[0, 0, 0, 0], [0, 0, 0, 0], [3, 3, 9, 9]])
    np.testing.assert_array_equal(valid, [[False, True, True], [False, False, True]])
    # every RoI scores class 2 with high confidence: the y2 == 0 proposal keeps a detection only with the switch off
    cls = jnp.tile(jnp.asarray([0, 0, 9.0, 0, 0, 0]), (6, 1))
    reg = jnp.zeros((6, 20))
    sizes = jnp.asarray([[64, 96], [64, 96]])
    # (5 classes: a zeroed row scores 1/6 everywhere, under the threshold 0.5)
    on_model = model.clone(test_cfg=maskrcnn.RCNNTestConfig(score_thr=0.5, max_per_img=10))
    on = maskrcnn.bboxes_from_roi_outputs(on_model, rois, valid, cls, reg, sizes)
    off_model = model.clone(test_cfg=maskrcnn.RCNNTestConfig(score_thr=0.5, max_per_img=10, zero_y2_rois=False))
    off = maskrcnn.bboxes_from_roi_outputs(off_model, rois, valid, cls, reg, sizes)
    assert on.count.tolist() == [1, 1] and off.count.tolist() == [2, 1]
    np.testing.assert_array_equal(on.boxes[0, 0], [1, 2, 30, 40])
    np.testing.assert_array_equal(off.boxes[0, :2], [[1, 2, 30, 40], [5, 0, 20, 0]])
    assert (on.labels[:, 0] == 2).all()


def test_transposed_conv_and_mask_pasting_against_torch():
    torch = required.torch()
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    module = ConvTranspose2x2(4)
    variables = module.init(jax.random.key(0), x)
    sd = convert.to_torch_state_dict(variables)
    theirs = F.conv_transpose2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        torch.from_numpy(np.array(sd["weight"])),
        torch.from_numpy(np.array(sd["bias"])),
        stride=2,
    )
    np.testing.assert_allclose(np.asarray(module.apply(variables, x)), theirs.numpy().transpose(0, 2, 3, 1), atol=1e-5)

    # mmdet 2.11 _do_paste_mask (skip_empty) + get_seg_masks' threshold, one mask at a time
    h, w = 40, 52
    probs = rng.random((6, 28, 28)).astype(np.float32)
    boxes = np.array(
        [
            [3.2, 4.7, 30.1, 25.9],
            [0, 0, 52, 40],
            [40.5, 30.2, 51.9, 39.99],
            [-5, -3, 10, 8],
            [10, 10, 10.5, 30],
            [20, 5, 20, 9],
        ],
        np.float32,
    )

    def paste(p, b):
        b = torch.from_numpy(b)[None]
        x0_int = max(int(math.floor(float(b[0, 0])) - 1), 0)
        y0_int = max(int(math.floor(float(b[0, 1])) - 1), 0)
        x1_int = min(int(math.ceil(float(b[0, 2])) + 1), w)
        y1_int = min(int(math.ceil(float(b[0, 3])) + 1), h)
        x0, y0, x1, y1 = torch.split(b, 1, dim=1)
        img_y = torch.arange(y0_int, y1_int, dtype=torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int, dtype=torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        img_x[torch.isinf(img_x)] = 0
        img_y[torch.isinf(img_y)] = 0
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        grid = torch.stack([gx, gy], dim=3)
        val = F.grid_sample(torch.from_numpy(p)[None, None], grid, align_corners=False)[0, 0]
        out = np.zeros((h, w), bool)
        out[y0_int:y1_int, x0_int:x1_int] = (val >= 0.5).numpy()
        return out

    ours = np.asarray(paste_masks(jnp.asarray(probs), jnp.asarray(boxes), h, w))
    for k in range(len(boxes)):
        theirs = paste(probs[k], boxes[k])
        assert (ours[k] != theirs).sum() <= 1, f"mask {k}: {(ours[k] != theirs).sum()} pixels differ"
