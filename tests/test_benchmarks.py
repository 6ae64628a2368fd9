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


def test_detection_benchmark_infer_mode_reports_speed_and_memory():
    import detection

    result = detection.main(["--mode=infer", "--batch=1", "--height=64", "--width=64", "--steps=1", "--warmup=0"])
    assert result["mode"] == "infer" and result["img_per_s"] > 0
    assert result["peak_rss_bytes"] >= result["import_rss_bytes"] > 0
    assert result["peak_bytes"] > 0 and "speedup" not in result
