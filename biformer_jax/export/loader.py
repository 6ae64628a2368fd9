"""Runs a StableHLO artifact of `python -m biformer_jax.export` with jax alone (standalone file).

This file imports only jax, numpy and (for image files) PIL: copy it next to the artifact and run

    python loader.py model.stablehlo cat.jpg dog.png        # one JSON line per image, top 5

or use it from Python:

    from loader import load
    predict = load("model.stablehlo")       # reads model.stablehlo.json beside it
    logits = predict.logits(images_nhwc)    # (N, H, W, 3) float32, preprocessed
    top = predict.classify(["cat.jpg"], top_k=5)

The artifact runs on whatever platform jax uses (cpu, cuda or tpu); the batch size is free, and
so are height and width where the spec's input shape says None (any size >= its `min_size`).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from jax import export as jax_export


class Predictor:
    """A deserialized artifact and its spec (preprocessing, class names)."""

    def __init__(self, artifact: str, spec: dict):
        with open(artifact, "rb") as f:
            self.exported = jax_export.deserialize(bytearray(f.read()))
        self.spec = spec
        self.class_names = spec["class_names"]

    def check_shape(self, shape: tuple) -> None:
        """A ValueError naming the problem when the artifact cannot take images of `shape`."""
        want = self.spec["input"]["shape"]  # [None, S, S, 3], or [None, None, None, 3] (symbolic size)
        if len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
            raise ValueError(f"images must be (N, H, W, 3) NHWC with N >= 1, got shape {tuple(shape)}.")
        h, w = shape[1], shape[2]
        if want[1] is not None and (h, w) != (want[1], want[2]):
            raise ValueError(
                f"this artifact takes {want[1]}x{want[2]} images (fixed size), got {h}x{w}; resize/crop them "
                "as the spec's preprocess says."
            )
        mh, mw = self.spec.get("min_size", [1, 1])
        if h < mh or w < mw:
            raise ValueError(
                f"{h}x{w} images are too small for this model: it needs at least {mh}x{mw} (its K/V pooling "
                "window must fit in every region); resize them up."
            )

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) float32 NHWC, preprocessed -> (N, classes) float32 logits.

        H, W: the spec's image size, or any size >= its `min_size` for a symbolic-size artifact."""
        images = np.asarray(images, np.float32)
        self.check_shape(images.shape)
        return np.asarray(self.exported.call(images))

    def preprocess(self, path: str) -> np.ndarray:
        """The spec's eval transform: shorter side to `resize`, center crop, [0, 1], mean/std."""
        from PIL import Image

        p = self.spec["preprocess"]
        size, resize = p["image_size"], p["resize"]
        filters = {
            "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST,
        }
        with Image.open(path) as img:
            img = img.convert("RGB")
        w, h = img.size
        if min(w, h) != resize:  # torchvision Resize(int): the longer side truncated
            long = int(resize * max(w, h) / min(w, h))
            new = (resize, long) if w <= h else (long, resize)
            img = img.resize(new, filters[p["interpolation"]])
        w, h = img.size
        if w < size or h < size:  # zero padding where smaller, as torchvision's CenterCrop
            canvas = Image.new("RGB", (max(w, size), max(h, size)))
            canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
            img, (w, h) = canvas, canvas.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        x = np.asarray(img, np.float32) / 255.0
        return (x - np.asarray(p["mean"], np.float32)) / np.asarray(p["std"], np.float32)

    def classify(self, paths: list[str], top_k: int = 5) -> list[dict]:
        """Top-k labels and softmax probabilities of each image file."""
        logits = self.logits(np.stack([self.preprocess(p) for p in paths]))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = []
        for path, row in zip(paths, probs):
            top = np.argsort(-row, kind="stable")[:top_k]
            out.append({"path": path, "labels": [self.class_names[i] for i in top], "probabilities": row[top].tolist()})
        return out


def load(artifact: str, spec: str | None = None) -> Predictor:
    """The artifact and its spec JSON (default: ARTIFACT.json, as the exporter writes it)."""
    spec = spec or artifact + ".json"
    with open(spec) as f:
        return Predictor(artifact, json.load(f))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python loader.py ARTIFACT IMAGE...", file=sys.stderr)
        return 2
    predictor = load(argv[0])
    for record in predictor.classify(argv[1:]):
        print(json.dumps(record))
    print(f"platform: {jax.default_backend()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
