"""Mask R-CNN's neck and heads in PyTorch, to time the official BiFormer as a Mask R-CNN (inference).

mmdetection does not install here, so `benchmarks/detection.py --mode=infer --official_repo` with
a `maskrcnn_biformer_*` model puts the official backbone (`torch_retinanet.OfficialBackbone`:
`BiFormer_mm`) under these stand-ins, written to the same shapes and FLOPs as our `MaskRCNN`
(models/detection/maskrcnn.py) and to mmdet 2.11's test path (`simple_test`, `rescale=False`):

- FPN `start_level=0`, 5 outputs, P6 = max_pool2d(P5, 1, stride 2) (`torch_retinanet.FPN`);
- `RPNHead` (3x3 conv + ReLU, 1x1 class / box convs, 3 anchors of scale 8 at strides 4-64);
  proposals: per level the top 1000 by sigmoid score, decoded (`DeltaXYWHBBoxCoder`, means 0, stds
  1, `wh_ratio_clip` 16/1000, clipped to the image), NMS 0.7 per level (`batched_nms` with the
  level as the group), the first 1000;
- `SingleRoIExtractor` (level floor(log2(sqrt(wh) / 56 + 1e-6)) clamped to 0-3) with RoIAlign
  (7 / 14, `sampling_ratio=0`, `aligned=True`), `Shared2FCBBoxHead` (2 x FC 1024, 81-way
  softmax, class-specific deltas, stds 0.1/0.1/0.2/0.2) with 2.11's zeroing of RoIs whose
  `y2 == 0`, `multiclass_nms` (score > 0.05, class-wise NMS 0.5, 100 kept);
- `FCNMaskHead` (4 x 3x3 conv + ReLU, 2x2 stride-2 deconv + ReLU, 1x1 to 80 maps) on the
  detections, each at its label, sigmoid, pasted into the image as mmdet's CPU path does
  (`_do_paste_mask`, `skip_empty`: grid_sample over the box's pixels only) and `>= 0.5`.

RoIAlign and NMS are torchvision's CPU kernels (`torchvision.ops.roi_align`, `batched_nms`), the
kernels mmcv's CPU ops share, so the official side runs compiled code where mmdet does.
torchvision beside the project's torch 2.13.0 does not import: run the worker under a Python with
a matching torch + torchvision (`detection.py --official_python`, e.g. a venv made with
`pip install torch==2.14.1 torchvision==0.29.1 einops`). `tests/test_benchmarks.py` checks the
parameter count and output shapes against ours (no torchvision needed for those).

Run as a worker by detection.py (`--serve`), as torch_retinanet.py is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch_retinanet as tr
from torch import nn

RPN_STRIDES = (4, 8, 16, 32, 64)
ROI_STRIDES = (4, 8, 16, 32)
RPN_SCALES = (8.0,)
WH_RATIO_CLIP = 16 / 1000
# Untrained box heads score every class near 1/81 < 0.05, so mmdet's test path would keep no
# detection and skip the mask head. The worker biases the class logits so that this many classes
# score ~1/CONFIDENT_CLASSES on every RoI: the class-wise NMS then fills the 100 detections a
# trained model keeps on a COCO image, and the mask head and pasting run on all of them (our
# static-shape path always does that work).
CONFIDENT_CLASSES = 10


class RPNHead(nn.Module):
    """Per level (N, A, H, W) objectness logits and (N, A*4, H, W) deltas."""

    def __init__(self, in_channels: int = 256, num_anchors: int = 3):
        super().__init__()
        self.rpn_conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(in_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(in_channels, num_anchors * 4, 1)

    def forward(self, feats):
        hidden = [F.relu(self.rpn_conv(x)) for x in feats]
        return [self.rpn_cls(x) for x in hidden], [self.rpn_reg(x) for x in hidden]


class Shared2FCBBoxHead(nn.Module):
    """(R, C, 7, 7) -> (R, num_classes + 1) logits, (R, num_classes * 4) deltas."""

    def __init__(self, num_classes: int, in_channels: int = 256, roi: int = 7, fc: int = 1024):
        super().__init__()
        self.shared_fcs = nn.ModuleList([nn.Linear(in_channels * roi * roi, fc), nn.Linear(fc, fc)])
        self.fc_cls = nn.Linear(fc, num_classes + 1)
        self.fc_reg = nn.Linear(fc, num_classes * 4)

    def forward(self, x):
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class FCNMaskHead(nn.Module):
    """(R, C, 14, 14) -> (R, num_classes, 28, 28) logits."""

    def __init__(self, num_classes: int, channels: int = 256, num_convs: int = 4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_convs))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.conv_logits(F.relu(self.upsample(x)))


def decode(rois: torch.Tensor, deltas: torch.Tensor, max_shape, stds=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """mmdet's delta2bbox (means 0): (R, 4) rois, (R, 4k) deltas -> (R, 4k) boxes clipped to (H, W)."""
    deltas = deltas.reshape(len(deltas), -1, 4) * deltas.new_tensor(stds)
    clip = abs(math.log(WH_RATIO_CLIP))
    dx, dy = deltas[..., 0], deltas[..., 1]
    dw, dh = deltas[..., 2].clamp(-clip, clip), deltas[..., 3].clamp(-clip, clip)
    px, py = ((rois[:, 0] + rois[:, 2]) * 0.5)[:, None], ((rois[:, 1] + rois[:, 3]) * 0.5)[:, None]
    pw, ph = (rois[:, 2] - rois[:, 0])[:, None], (rois[:, 3] - rois[:, 1])[:, None]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * dx, py + ph * dy
    h, w = max_shape
    boxes = torch.stack(
        [
            (gx - gw * 0.5).clamp(0, w),
            (gy - gh * 0.5).clamp(0, h),
            (gx + gw * 0.5).clamp(0, w),
            (gy + gh * 0.5).clamp(0, h),
        ],
        -1,
    )
    return boxes.reshape(len(rois), -1)


def roi_levels(rois: torch.Tensor, num_levels: int = len(ROI_STRIDES)) -> torch.Tensor:
    """SingleRoIExtractor.map_roi_levels of (R, 4) boxes."""
    scale = ((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])).sqrt()
    return torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, num_levels - 1).long()


def extract(feats, rois: torch.Tensor, out: int) -> torch.Tensor:
    """SingleRoIExtractor on one image: (R, 4) boxes -> (R, C, out, out), each RoI from its level."""
    from torchvision.ops import roi_align

    levels = roi_levels(rois)
    pooled = rois.new_zeros(len(rois), feats[0].shape[1], out, out)
    for level, stride in enumerate(ROI_STRIDES):
        idx = (levels == level).nonzero().flatten()
        if len(idx):
            boxes = torch.cat([rois.new_zeros(len(idx), 1), rois[idx]], 1)
            pooled[idx] = roi_align(feats[level], boxes, out, 1.0 / stride, sampling_ratio=0, aligned=True)
    return pooled


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, h: int, w: int, thr: float = 0.5) -> torch.Tensor:
    """mmdet 2.11 `_do_paste_mask` on the CPU (one mask per chunk, `skip_empty`): (K, 28, 28)
    probabilities, (K, 4) boxes -> (K, h, w) bool."""
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for k in range(len(boxes)):
        x0, y0, x1, y1 = boxes[k]
        xa, ya = int(max(math.floor(float(x0)) - 1, 0)), int(max(math.floor(float(y0)) - 1, 0))
        xb, yb = int(min(math.ceil(float(x1)) + 1, w)), int(min(math.ceil(float(y1)) + 1, h))
        img_y = (torch.arange(ya, yb, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        img_x = (torch.arange(xa, xb, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack(
            [img_x[None, :].expand(len(img_y), -1), img_y[:, None].expand(-1, len(img_x))], -1
        )  # (yb - ya, xb - xa, 2)
        pasted = F.grid_sample(probs[k][None, None], grid[None], align_corners=False)[0, 0]
        masks[k, ya:yb, xa:xb] = pasted >= thr
    return masks


class OfficialMaskRCNN(nn.Module):
    """The official BiFormer (BiFormer_mm) + FPN + RPNHead + Shared2FCBBoxHead + FCNMaskHead."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = tr.OfficialBackbone(backbone)
        self.neck = tr.FPN(self.backbone.dims, start_level=0, add_extra_convs=False)
        self.rpn_head = RPNHead()
        self.bbox_head = Shared2FCBBoxHead(num_classes)
        self.mask_head = FCNMaskHead(num_classes)

    def proposals(self, cls_scores, bbox_preds, size, nms_pre=1000, iou=0.7, max_per_img=1000):
        """RPNHead._get_bboxes of one image (index 0 of the batch) -> (P, 4) boxes, (P,) scores."""
        from torchvision.ops import batched_nms

        anchors = tr.grid_anchors([tuple(s.shape[2:]) for s in cls_scores], RPN_STRIDES, RPN_SCALES)
        sizes = [s.shape[2] * s.shape[3] * s.shape[1] for s in cls_scores]
        boxes, scores, ids = [], [], []
        for level, (score, delta, a) in enumerate(zip(cls_scores, bbox_preds, anchors.split(sizes))):
            score = score[0].permute(1, 2, 0).reshape(-1).sigmoid()
            delta = delta[0].permute(1, 2, 0).reshape(-1, 4)
            if len(score) > nms_pre:
                score, order = score.sort(descending=True)
                score, order = score[:nms_pre], order[:nms_pre]
                delta, a = delta[order], a[order]
            boxes.append(decode(a, delta, size))
            scores.append(score)
            ids.append(torch.full_like(score, level, dtype=torch.long))
        boxes, scores, ids = torch.cat(boxes), torch.cat(scores), torch.cat(ids)
        keep = batched_nms(boxes, scores, ids, iou)[:max_per_img]
        return boxes[keep], scores[keep]

    def forward(self, x, score_thr=0.05, iou=0.5, max_per_img=100):
        """Inference of a batch of one image -> (boxes (K, 4), scores (K,), labels (K,), masks (K, H, W))."""
        from torchvision.ops import batched_nms

        size = tuple(x.shape[2:])
        fpn = self.neck(self.backbone(x))
        rois, _ = self.proposals(*self.rpn_head(fpn), size)
        cls_score, bbox_pred = self.bbox_head(extract(fpn, rois, 7))
        zero = rois[:, 3] == 0  # 2.11's supplement mask: RoIs with y2 == 0 get zero outputs
        cls_score, bbox_pred = cls_score.masked_fill(zero[:, None], 0), bbox_pred.masked_fill(zero[:, None], 0)
        scores = cls_score.softmax(-1)[:, :-1]  # (R, C)
        boxes = decode(rois, bbox_pred, size, stds=(0.1, 0.1, 0.2, 0.2)).reshape(len(rois), -1, 4)
        num_classes = scores.shape[1]
        valid = scores > score_thr
        labels = torch.arange(num_classes).expand_as(scores)[valid]
        boxes, scores = boxes[valid], scores[valid]
        keep = batched_nms(boxes, scores, labels, iou)[:max_per_img]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        logits = self.mask_head(extract(fpn, boxes, 14))  # (K, C, 28, 28)
        probs = logits[torch.arange(len(labels)), labels].sigmoid()
        return boxes, scores, labels, paste_masks(probs, boxes, *size)


def serve(args) -> None:
    """Builds the official Mask R-CNN, then runs one inference per 'step' line; prints peak RSS on 'stop'."""
    if args.mode != "infer" or args.batch != 1:
        raise SystemExit("torch_maskrcnn.py times inference of one image per step (--mode=infer --batch=1).")
    net = OfficialMaskRCNN(tr.official_backbone(args), args.num_classes).eval()
    with torch.no_grad():  # a trained model's load: every image keeps the 100 detections mmdet allows
        net.bbox_head.fc_cls.bias[:] = -10.0
        net.bbox_head.fc_cls.bias[:CONFIDENT_CLASSES] = 10.0
    images = torch.randn(args.batch, 3, args.height, args.width, generator=torch.Generator().manual_seed(0))

    def step():
        with torch.no_grad():
            boxes = net(images)[0]
        if len(boxes) != 100:
            raise RuntimeError(f"the official Mask R-CNN kept {len(boxes)} detections, not the 100 the benchmark times")

    tr.serve_steps(step)


if __name__ == "__main__":
    serve(tr.worker_args(__doc__))
