"""benchmarks/dot_bound.py reads every dot of a compiled program, with its shapes and FLOPs."""

from __future__ import annotations

import dot_bound
import jax
import jax.numpy as jnp


def test_dot_bound_finds_every_dot_of_a_compiled_program():
    def f(a, b, w):
        h = jax.nn.gelu(jnp.einsum("bij,bjk->bik", a, b))  # batched: 4 x (32x48 . 48x64)
        return jnp.tanh(h.reshape(-1, 64) @ w).sum()  # (128x64 . 64x16), fused with tanh

    args = (jnp.ones((4, 32, 48)), jnp.ones((4, 48, 64)), jnp.ones((64, 16)))
    text = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    dots = dot_bound.program_dots(text)
    # Forward 2 dots; backward: 2 for the batched einsum's inputs, 1 for x and 1 for w of the matmul.
    assert sum(dots.values()) == 6, dots
    flops = sum(n * dot_bound.dot_flops(key) for key, n in dots.items())
    assert flops == 3 * (2 * 4 * 32 * 48 * 64 + 2 * 128 * 64 * 16)
    key = next(iter(dots))
    assert dot_bound.time_dot(key, repeats=1) > 0


def test_torch_retinanet_matches_our_neck_head_and_loss():
    """benchmarks/torch_retinanet.py, the official backbone's detector in the 800x1333 benchmark:
    the same parameters and output shapes as our FPN + RetinaHead, and the same loss on the same outputs."""
    import numpy as np
    import torch
    import torch_retinanet as tr

    from biformer_jax.detection import AnchorGenerator, DeltaXYWHBBoxCoder
    from biformer_jax.models.detection import anchor_head
    from biformer_jax.models.detection.fpn import DetFPN
    from biformer_jax.models.detection.retina_head import RetinaHead

    dims, (h, w), num_classes = (64, 128, 256, 512), (64, 96), 3
    feats = [jnp.zeros((1, h // s, w // s, c)) for s, c in zip((4, 8, 16, 32), dims)]
    neck = DetFPN(256, 5, 1, add_extra_convs="on_input")
    head = RetinaHead(num_classes)
    neck_vars = jax.eval_shape(neck.init, jax.random.key(0), feats)
    outs = jax.eval_shape(neck.apply, neck_vars, feats)
    head_vars = jax.eval_shape(head.init, jax.random.key(0), outs)
    cls_shapes, reg_shapes = jax.eval_shape(head.apply, head_vars, outs)
    ours = sum(x.size for x in jax.tree.leaves((neck_vars, head_vars)))
    t_neck, t_head = tr.FPN(list(dims)), tr.RetinaHead(num_classes)
    assert sum(p.numel() for p in [*t_neck.parameters(), *t_head.parameters()]) == ours
    with torch.no_grad():
        t_cls, t_reg = t_head(t_neck([torch.zeros(1, c, h // s, w // s) for s, c in zip((4, 8, 16, 32), dims)]))
    nhwc = lambda t: tuple(t.permute(0, 2, 3, 1).shape)  # noqa: E731
    assert [nhwc(t) for t in t_cls] == [x.shape for x in cls_shapes]
    assert [nhwc(t) for t in t_reg] == [x.shape for x in reg_shapes]

    # The loss on random head outputs of two images, boxes of 10-40% of the image's sides.
    gen = torch.Generator().manual_seed(0)
    cls = [torch.randn(2, *x.shape[3:0:-1], generator=gen).transpose(2, 3) for x in cls_shapes]
    reg = [0.3 * torch.randn(2, *x.shape[3:0:-1], generator=gen).transpose(2, 3) for x in reg_shapes]
    boxes, labels = tr.random_boxes(2, 4, h, w, num_classes, gen)
    t_loss = tr.retinanet_loss(cls, reg, boxes, labels)
    to_nhwc = lambda ts: [jnp.asarray(t.permute(0, 2, 3, 1).numpy()) for t in ts]  # noqa: E731
    anchors = AnchorGenerator(strides=tr.STRIDES, ratios=tr.RATIOS, octave_base_scale=4, scales_per_octave=3)
    j_loss = anchor_head.losses(
        to_nhwc(cls),
        to_nhwc(reg),
        anchors,
        DeltaXYWHBBoxCoder(),
        jnp.asarray(torch.stack(boxes).numpy()),
        jnp.asarray(torch.stack(labels).numpy()),
        jnp.ones((2, 4), bool),
        jnp.tile(jnp.int32([[h, w]]), (2, 1)),
    )
    np.testing.assert_allclose(float(t_loss[0]), float(j_loss["loss_cls"]), rtol=1e-5)
    np.testing.assert_allclose(float(t_loss[1]), float(j_loss["loss_bbox"]), rtol=1e-5)


def test_torch_maskrcnn_matches_our_neck_heads_coder_and_pasting():
    """benchmarks/torch_maskrcnn.py, the official backbone's Mask R-CNN in the 800x1333 benchmark:
    the same parameters and RPN output shapes as our FPN + RPNHead + RoIHead, the same RPN anchors,
    box decoding and mask pasting (its RoIAlign and NMS are torchvision's, not installed here)."""
    import numpy as np
    import torch
    import torch_maskrcnn as tm
    import torch_retinanet as tr

    from biformer_jax.detection import AnchorGenerator, DeltaXYWHBBoxCoder
    from biformer_jax.models.detection.fpn import DetFPN
    from biformer_jax.models.detection.roi_heads import RoIHead, paste_masks
    from biformer_jax.models.detection.rpn_head import RPNHead

    dims, (h, w), num_classes = (64, 128, 256, 512), (64, 96), 3
    feats = [jnp.zeros((1, h // s, w // s, c)) for s, c in zip((4, 8, 16, 32), dims)]
    neck, rpn, roi = DetFPN(256, 5, 0, add_extra_convs=False), RPNHead(3, 256), RoIHead(num_classes)
    neck_vars = jax.eval_shape(neck.init, jax.random.key(0), feats)
    outs = jax.eval_shape(neck.apply, neck_vars, feats)
    rpn_vars = jax.eval_shape(rpn.init, jax.random.key(0), outs)
    cls_shapes, reg_shapes = jax.eval_shape(rpn.apply, rpn_vars, outs)
    roi_vars = jax.eval_shape(roi.init, jax.random.key(0), outs, jnp.zeros((1, 2, 4)))
    ours = sum(x.size for x in jax.tree.leaves((neck_vars, rpn_vars, roi_vars)))
    t_neck = tr.FPN(list(dims), start_level=0, add_extra_convs=False)
    t_heads = [t_neck, tm.RPNHead(), tm.Shared2FCBBoxHead(num_classes), tm.FCNMaskHead(num_classes)]
    assert sum(p.numel() for m in t_heads for p in m.parameters()) == ours
    with torch.no_grad():
        t_cls, t_reg = t_heads[1](t_neck([torch.zeros(1, c, h // s, w // s) for s, c in zip((4, 8, 16, 32), dims)]))
    nhwc = lambda t: tuple(t.permute(0, 2, 3, 1).shape)  # noqa: E731
    assert [nhwc(t) for t in t_cls] == [x.shape for x in cls_shapes]
    assert [nhwc(t) for t in t_reg] == [x.shape for x in reg_shapes]

    sizes = [x.shape[1:3] for x in cls_shapes]
    anchors = AnchorGenerator(tm.RPN_STRIDES, tr.RATIOS, tm.RPN_SCALES, octave_base_scale=None, scales_per_octave=None)
    ours_anchors = np.concatenate([np.asarray(a).reshape(-1, 4) for a in anchors.grid_anchors(sizes)])
    np.testing.assert_array_equal(tr.grid_anchors(sizes, tm.RPN_STRIDES, tm.RPN_SCALES).numpy(), ours_anchors)

    rng = np.random.default_rng(0)
    rois = np.sort(rng.uniform(-5, 90, (40, 2, 2)), axis=1).reshape(40, 4).astype(np.float32)  # x1 y1 x2 y2
    deltas = rng.normal(0, 2, (40, 8)).astype(np.float32)  # two classes' deltas, some past wh_ratio_clip
    stds = (0.1, 0.1, 0.2, 0.2)
    theirs = tm.decode(torch.from_numpy(rois), torch.from_numpy(deltas), (h, w), stds).numpy()
    mine = DeltaXYWHBBoxCoder(target_stds=stds).decode(jnp.asarray(rois), jnp.asarray(deltas), max_shape=(h, w))
    np.testing.assert_allclose(theirs, np.asarray(mine), rtol=1e-6, atol=1e-4)

    probs = rng.uniform(0, 1, (6, 28, 28)).astype(np.float32)
    boxes = np.array([[3, 4, 50, 40], [10.5, 0.2, 30.7, 63.9], [-4, -3, 20, 15], [60, 30, 99, 70]], np.float32)
    boxes = np.concatenate([boxes, rois[:2]])
    t_masks = tm.paste_masks(torch.from_numpy(probs), torch.from_numpy(boxes), h, w).numpy()
    j_masks = np.asarray(paste_masks(jnp.asarray(probs), jnp.asarray(boxes), h, w))
    print("pasted pixels that differ:", (t_masks != j_masks).mean())
    assert t_masks.any() and (t_masks != j_masks).mean() < 1e-3, (t_masks != j_masks).mean()


def test_detection_benchmark_infer_mode_reports_speed_and_memory():
    import detection

    result = detection.main(["--mode=infer", "--batch=1", "--height=64", "--width=64", "--steps=1", "--warmup=0"])
    assert result["mode"] == "infer" and result["img_per_s"] > 0
    assert result["peak_rss_bytes"] >= result["import_rss_bytes"] > 0
    assert result["peak_bytes"] > 0 and "speedup" not in result
