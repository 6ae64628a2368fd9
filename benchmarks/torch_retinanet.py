"""RetinaNet's neck, head and loss in plain PyTorch, to time the official BiFormer as a detector.

mmdetection does not install here, so `benchmarks/detection.py --official_repo` puts the
official backbone (rayleizhu/BiFormer `BiFormer` as its `BiFormer_mm` builds it: no `head` /
`norm`, a LayerNorm2d (eps 1e-6) on each stage output, BatchNorms in eval mode) under these
stand-ins, written here to the same shapes and FLOPs as our `DetFPN` + `RetinaHead`
(models/detection/): mmdet 2.11's FPN (`start_level=1`, `add_extra_convs='on_input'`, 5 outputs),
RetinaHead (4 stacked 3x3 convs + ReLU per branch, 9 anchors) and the RetinaNet loss (anchors of
strides 8-128, max-IoU assignment at 0.5 / 0.4, sigmoid focal loss + L1 on the deltas, both
divided by the positives). `tests/test_benchmarks.py` checks the parameter count, the output
shapes and the loss against ours.

Run as a worker by detection.py (`--serve`): one line in ("step" / "stop"), one line out, so the
worker imports neither JAX nor our package and its peak RSS is the official model's alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = (8, 16, 32, 64, 128)
RATIOS = (0.5, 1.0, 2.0)
OCTAVE_BASE_SCALE, SCALES_PER_OCTAVE = 4, 3


class FPN(nn.Module):
    """mmdet's FPN: with `add_extra_convs=True` (RetinaNet: `start_level=1`, 'on_input') the extra
    levels are 3x3 stride-2 convs on the last input (no ReLU before them); with False (Mask R-CNN:
    `start_level=0`) each extra level is `max_pool2d(kernel 1, stride 2)` of the last output."""

    def __init__(
        self, in_channels, out_channels: int = 256, num_outs: int = 5, start_level: int = 1, add_extra_convs=True
    ):
        super().__init__()
        self.start_level, self.num_outs = start_level, num_outs
        used = in_channels[start_level:]
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in used)
        self.fpn = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in used)
        extra = []
        if add_extra_convs:
            extra.append(nn.Conv2d(in_channels[-1], out_channels, 3, stride=2, padding=1))
            for _ in range(num_outs - len(used) - 1):
                extra.append(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1))
        self.extra = nn.ModuleList(extra)

    def forward(self, feats):
        inputs = feats[self.start_level :]
        lat = [conv(x) for conv, x in zip(self.lateral, inputs)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn, lat)]
        if not self.extra:
            while len(outs) < self.num_outs:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            return outs
        source = feats[-1]
        for conv in self.extra:
            outs.append(conv(source))
            source = outs[-1]
        return outs


class RetinaHead(nn.Module):
    """RetinaHead shared over levels: per level (N, A*C, H, W) logits and (N, A*4, H, W) deltas."""

    def __init__(self, num_classes: int, in_channels: int = 256, stacked_convs: int = 4, num_anchors: int = 9):
        super().__init__()

        def branch():
            layers = []
            for _ in range(stacked_convs):
                layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        self.cls_convs, self.reg_convs = branch(), branch()
        self.retina_cls = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feats):
        cls = [self.retina_cls(self.cls_convs(x)) for x in feats]
        reg = [self.retina_reg(self.reg_convs(x)) for x in feats]
        return cls, reg


def grid_anchors(sizes, strides=STRIDES, scales=None) -> torch.Tensor:
    """(sum H*W*A, 4) anchors (x1, y1, x2, y2): positions row-major, then ratio-major base anchors
    (mmdet's AnchorGenerator with center_offset 0). `scales` default: RetinaNet's octave scales."""
    if scales is None:
        scales = OCTAVE_BASE_SCALE * 2.0 ** (torch.arange(SCALES_PER_OCTAVE) / SCALES_PER_OCTAVE)
    scales = torch.as_tensor(scales, dtype=torch.float32)
    h_ratios = torch.tensor(RATIOS).sqrt()
    out = []
    for s, (h, w) in zip(strides, sizes):
        ws = (s / h_ratios[:, None] * scales[None]).reshape(-1)
        hs = (s * h_ratios[:, None] * scales[None]).reshape(-1)
        base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], -1)
        yy, xx = torch.meshgrid(torch.arange(h) * float(s), torch.arange(w) * float(s), indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], -1).reshape(-1, 1, 4)
        out.append((shifts + base).reshape(-1, 4))
    return torch.cat(out)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) IoU of (x1, y1, x2, y2) boxes (no +1)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def assign(anchors, gt, pos_thr: float = 0.5, neg_thr: float = 0.4):
    """Max-IoU assignment: (gt index per anchor, -1 negative, -2 ignored), min_pos_iou 0, every
    anchor tied for a box's best IoU assigned to it (later boxes win)."""
    ious = box_iou(gt, anchors)  # (G, A)
    best, arg = ious.max(0)
    assigned = torch.full_like(arg, -2)
    assigned[best < neg_thr] = -1
    assigned[best >= pos_thr] = arg[best >= pos_thr]
    gt_best = ious.max(1).values
    for i in range(len(gt)):
        assigned[ious[i] == gt_best[i]] = i
    return assigned


def encode(anchors, gt):
    """DeltaXYWHBBoxCoder (means 0, stds 1): (dx, dy, dw, dh) of gt against anchors."""
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    dx = (gt[:, 0] + gt[:, 2] - anchors[:, 0] - anchors[:, 2]) * 0.5 / pw
    dy = (gt[:, 1] + gt[:, 3] - anchors[:, 1] - anchors[:, 3]) * 0.5 / ph
    return torch.stack([dx, dy, torch.log(gw / pw), torch.log(gh / ph)], -1)


def retinanet_loss(cls_scores, bbox_preds, gt_bboxes, gt_labels, gamma: float = 2.0, alpha: float = 0.25):
    """(loss_cls, loss_bbox) of a batch whose images fill the input (all anchors valid).

    `gt_bboxes`: per image a (G, 4) tensor, `gt_labels` per image (G,) in [0, C).
    """
    n, num_classes = cls_scores[0].shape[0], cls_scores[0].shape[1] // 9
    anchors = grid_anchors([tuple(s.shape[2:]) for s in cls_scores])
    logits = torch.cat([s.permute(0, 2, 3, 1).reshape(n, -1, num_classes) for s in cls_scores], 1)
    deltas = torch.cat([d.permute(0, 2, 3, 1).reshape(n, -1, 4) for d in bbox_preds], 1)
    loss_cls, loss_bbox, num_pos = logits.new_zeros(()), logits.new_zeros(()), 0
    for i in range(n):
        with torch.no_grad():
            assigned = assign(anchors, gt_bboxes[i])
            pos = assigned >= 0
            target = torch.zeros_like(logits[i])
            target[pos, gt_labels[i][assigned[pos]]] = 1.0
            box_target = encode(anchors[pos], gt_bboxes[i][assigned[pos]])
        keep = assigned != -2
        x, t = logits[i][keep], target[keep]
        p = torch.sigmoid(x)
        pt = (1 - p) * t + p * (1 - t)
        weight = (alpha * t + (1 - alpha) * (1 - t)) * pt.pow(gamma)
        loss_cls = loss_cls + (F.binary_cross_entropy_with_logits(x, t, reduction="none") * weight).sum()
        loss_bbox = loss_bbox + (deltas[i][pos] - box_target).abs().sum()
        num_pos += max(int(pos.sum()), 1)
    return loss_cls / num_pos, loss_bbox / num_pos


class OfficialBackbone(nn.Module):
    """The official BiFormer as BiFormer_mm builds it (passed in): no head / norm, a LayerNorm2d
    (eps 1e-6) on each stage's output, its BatchNorms in eval mode (norm_eval)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        del backbone.head, backbone.norm
        self.backbone = backbone
        self.dims = list(backbone.embed_dim)
        self.extra_norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in self.dims)  # LayerNorm2d

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.backbone.modules():  # norm_eval: the backbone's BatchNorms stay in eval mode
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, x):
        feats = []
        for i in range(4):
            x = self.backbone.stages[i](self.backbone.downsample_layers[i](x))
            feats.append(self.extra_norms[i](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous())
        return feats


class OfficialRetinaNet(nn.Module):
    """The official BiFormer (OfficialBackbone) + FPN + RetinaHead."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = OfficialBackbone(backbone)
        self.neck = FPN(self.backbone.dims)
        self.bbox_head = RetinaHead(num_classes)

    def forward(self, x):
        return self.bbox_head(self.neck(self.backbone(x)))


def random_boxes(n: int, m: int, height: int, width: int, num_classes: int, gen: torch.Generator):
    """m boxes per image, 10-40% of the image's sides, and their labels."""
    scale = torch.tensor([width, height], dtype=torch.float32)
    xy = torch.rand(n, m, 2, generator=gen) * 0.6 * scale
    wh = (0.1 + 0.3 * torch.rand(n, m, 2, generator=gen)) * scale
    return list(torch.cat([xy, xy + wh], -1)), list(torch.randint(0, num_classes, (n, m), generator=gen))


def official_backbone(args) -> nn.Module:
    """The official BiFormer (from `args.repo`) with `args.backbone_args`, wrapped as BiFormer_mm."""
    import inspect

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import official_pytorch as op

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cls = op.load_official(args.repo).BiFormer
    wanted = set(inspect.signature(cls).parameters)
    backbone_args = json.loads(args.backbone_args)
    return cls(**{k: v for k, v in backbone_args.items() if k in wanted})


def serve_steps(step) -> None:
    """The worker's loop: 'ready', then one `step()` and 'done' per 'step' line; on any other line
    its peak RSS in bytes."""
    import resource

    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        step()
        print("done", flush=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)  # Linux: KiB


def serve(args) -> None:
    """Builds the official detector, then runs one step per 'step' line; prints peak RSS on 'stop'."""
    net = OfficialRetinaNet(official_backbone(args), args.num_classes)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.height, args.width, generator=gen)
    boxes, labels = random_boxes(args.batch, args.max_boxes, args.height, args.width, args.num_classes, gen)
    if args.mode == "train":
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    else:
        net.eval()

    def step():
        if args.mode == "infer":
            with torch.no_grad():
                net(images)
            return
        loss_cls, loss_bbox = retinanet_loss(*net(images), boxes, labels)
        opt.zero_grad(set_to_none=True)
        (loss_cls + loss_bbox).backward()
        opt.step()

    serve_steps(step)


def worker_args(description: str, argv=None) -> argparse.Namespace:
    """The worker's command line (detection.py passes it)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--backbone_args", required=True, help="JSON: the backbone's constructor arguments")
    ap.add_argument("--mode", choices=("train", "infer"), required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1344)
    ap.add_argument("--num_classes", type=int, default=80)
    ap.add_argument("--max_boxes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    serve(worker_args(__doc__, argv))


if __name__ == "__main__":
    main()
