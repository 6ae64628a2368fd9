"""Prints host-side input pipeline throughput on ImageNet-sized JPEGs (no dataset needed).

    python scripts/bench_data.py [--images 64] [--threads 1 2] [--workers 0]

Writes synthetic 500x375 JPEGs (ImageNet's typical size, quality 90) into a temporary
ImageFolder tree, then times (1) one core decoding + transforming examples with the official
train recipe and the eval transform, and (2) data.train_iterator end to end for each
threads/workers setting. Figures are images per second on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _write_images(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k in range(count):
            d = root / split / f"class{k % 4}"
            d.mkdir(parents=True, exist_ok=True)
            # Smooth colour fields plus texture: JPEG sizes near ImageNet's (~110 kB at 500x375).
            low = rng.uniform(0, 255, (8, 10, 3)).astype(np.uint8)
            base = np.asarray(Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC), np.float32)
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(d / f"{k}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    from biformer_jax import data
    from biformer_jax.data import pipeline, sources
    from biformer_jax.data.classification import transforms

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_images(root, args.images)
        cfg = data.default_config()
        cfg.name, cfg.folder = "folder", str(root)
        source, _ = sources.open_source(cfg, "train")
        raw = [Path(p).read_bytes() for p in source.paths]
        print(f"{len(raw)} JPEGs 500x375, mean {np.mean([len(r) for r in raw]) / 1024:.0f} KiB")

        train_t, eval_t = transforms.TrainTransform(cfg), transforms.EvalTransform(cfg)
        for name, fn in (
            ("decode only", lambda b, i: sources._decode(b)),
            ("decode + train recipe", lambda b, i: train_t(sources._decode(b), pipeline.example_rng(0, 0, i))),
            ("decode + eval transform", lambda b, i: eval_t(sources._decode(b))),
        ):
            fn(raw[0], 0)
            start = time.perf_counter()
            for i, b in enumerate(raw):
                fn(b, i)
            rate = len(raw) / (time.perf_counter() - start)
            print(f"one core, {name:24s}: {rate:7.1f} img/s")

        steps = max(2, 2 * args.images // args.batch)
        for workers in args.workers:
            for threads in args.threads:
                cfg.workers, cfg.threads, cfg.prefetch = workers, threads, max(2, threads)
                it = data.train_iterator(
                    cfg, seed=0, start_step=0, global_batch_size=args.batch, process_index=0, process_count=1
                )
                next(it)  # start-up (worker spawn) not timed
                start = time.perf_counter()
                for _ in range(steps):
                    next(it)
                rate = steps * args.batch / (time.perf_counter() - start)
                it.close()
                print(f"train_iterator workers={workers} threads={threads}: {rate:7.1f} img/s")


if __name__ == "__main__":
    main()
