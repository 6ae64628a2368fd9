"""Semantic segmentation metrics as mmsegmentation computes them (mIoU, mAcc, aAcc).

Per image, pixels whose label is the ignore index are dropped; the rest add to four per-class
counts: the intersection (predicted class == label class), the predicted area, the label area and
the union (pred + label - intersection). The counts are summed over the whole dataset, then

    IoU[c] = intersect[c] / union[c]      Acc[c] = intersect[c] / label_area[c]
    aAcc = sum(intersect) / sum(label_area)
    mIoU = nanmean(IoU)                   mAcc = nanmean(Acc)

as mmseg's `total_intersect_and_union` + `nanmean` do: a class with no label pixel and no
predicted pixel has IoU 0/0 = NaN and is left out of the mean; a class predicted but absent
from the labels has IoU 0 (it counts, and pulls the mean down) and Acc NaN (left out of mAcc).
`reduce_zero_label` (ADE20K) is applied by the data source, not here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE_INDEX = 255


@dataclasses.dataclass
class SegCounts:
    """Per-class pixel counts summed over images: int64 arrays of shape (num_classes,)."""

    intersect: np.ndarray
    union: np.ndarray
    pred_area: np.ndarray
    label_area: np.ndarray
    num_images: int = 0

    @classmethod
    def zeros(cls, num_classes: int) -> SegCounts:
        z = np.zeros(num_classes, np.int64)
        return cls(z.copy(), z.copy(), z.copy(), z.copy(), 0)

    @property
    def num_classes(self) -> int:
        return len(self.intersect)

    def __add__(self, other: SegCounts) -> SegCounts:
        return SegCounts(
            self.intersect + other.intersect,
            self.union + other.union,
            self.pred_area + other.pred_area,
            self.label_area + other.label_area,
            self.num_images + other.num_images,
        )

    def as_array(self) -> np.ndarray:
        """(5, num_classes) int64: the four counts and the image count (to sum across processes)."""
        images = np.zeros(self.num_classes, np.int64)
        images[0] = self.num_images
        return np.stack([self.intersect, self.union, self.pred_area, self.label_area, images])

    @classmethod
    def from_array(cls, a: np.ndarray) -> SegCounts:
        a = np.asarray(a, np.int64)
        return cls(a[0], a[1], a[2], a[3], int(a[4, 0]))


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX):
    """The counts of one image: pred and label are integer maps of the same (H, W) shape."""
    pred, label = np.asarray(pred), np.asarray(label)
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in shape.")
    keep = label != ignore_index
    pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    if label.size and (label.min() < 0 or label.max() >= num_classes):
        bad = np.unique(label[(label < 0) | (label >= num_classes)])
        raise ValueError(
            f"label holds class ids {bad[:10].tolist()} outside [0, {num_classes}) that are not the "
            f"ignore index {ignore_index}."
        )
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"prediction holds class ids outside [0, {num_classes}).")
    hit = pred[pred == label]
    intersect = np.bincount(hit, minlength=num_classes)
    pred_area = np.bincount(pred, minlength=num_classes)
    label_area = np.bincount(label, minlength=num_classes)
    return SegCounts(intersect, pred_area + label_area - intersect, pred_area, label_area, 1)


def summarize(counts: SegCounts) -> dict[str, object]:
    """{"mIoU", "mAcc", "aAcc" (fractions), "IoU", "Acc" (per class, NaN where undefined)}."""
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = counts.intersect / counts.union.astype(np.float64)
        acc = counts.intersect / counts.label_area.astype(np.float64)
    total = counts.label_area.sum()
    a_acc = float(counts.intersect.sum() / total) if total else float("nan")
    return {
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "aAcc": a_acc,
        "IoU": iou,
        "Acc": acc,
    }


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def per_class_table(summary: dict[str, object], class_names: list[str] | tuple[str, ...]) -> str:
    """mmseg's per-class table: class, IoU and Acc in percent (nan where undefined)."""
    iou, acc = summary["IoU"], summary["Acc"]
    width = max([5, *(len(n) for n in class_names)])
    lines = [f"| {'Class':<{width}} |   IoU |   Acc |", f"|{'-' * (width + 2)}|-------|-------|"]
    for name, i, a in zip(class_names, iou, acc):
        lines.append(f"| {name:<{width}} | {_pct(i)} | {_pct(a)} |")
    lines.append(f"Summary: mIoU {_pct(summary['mIoU'])}  mAcc {_pct(summary['mAcc'])}  aAcc {_pct(summary['aAcc'])}")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "  nan" if np.isnan(x) else f"{100 * x:5.2f}"
