"""Detection train-step time: the task's RetinaNet step (tasks/detection/steps.py) at one bucket shape.

    python benchmarks/detection.py --model=retinanet_biformer_micro --batch=2 --height=96 --width=128
    python benchmarks/detection.py --model=retinanet_biformer_small --batch=2 --height=800 --width=1088

Random images and a few random boxes per image at (--height, --width) (a bucket shape of the
pipeline: one compile per shape), AdamW with the official settings, the backbone's BatchNorms
frozen, loss groups of 2 images. Prints the compile time, then one JSON line: step_ms (median
of --steps timed steps after --warmup), img_per_s, compile_s.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's biformer_jax first

from biformer_jax import models  # noqa: E402
from biformer_jax.tasks.detection import optim as det_optim  # noqa: E402
from biformer_jax.tasks.detection import steps as det_steps  # noqa: E402
from biformer_jax.training.train_state import init_train_state  # noqa: E402
from configs.det import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="retinanet_biformer_micro")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--num_classes", type=int, default=80)
    ap.add_argument("--max_boxes", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    return ap.parse_args(argv)


def random_batch(args, rng: np.random.Generator) -> dict[str, np.ndarray]:
    b, m, h, w = args.batch, args.max_boxes, args.height, args.width
    xy = rng.uniform(0, 0.6, (b, m, 2)) * [w, h]
    wh = rng.uniform(0.1, 0.4, (b, m, 2)) * [w, h]
    return {
        "image": rng.standard_normal((b, h, w, 3), np.float32),
        "gt_bboxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
        "gt_labels": rng.integers(0, args.num_classes, (b, m)).astype(np.int32),
        "gt_valid": np.arange(m)[None].repeat(b, 0) < rng.integers(1, m + 1, (b, 1)),
        "pad_shape": np.tile(np.int32([h, w]), (b, 1)),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    kw = {"num_classes": args.num_classes}
    if args.dtype != "float32":
        kw["dtype"] = jnp.dtype(args.dtype)
    model = models.create_model(args.model, **kw)
    config = common.get_base_config(args.model)
    tx, schedule, _ = det_optim.make_optimizer(config, steps_per_epoch=1000)
    state = jax.jit(
        functools.partial(
            init_train_state, model=model, tx=tx, input_shape=(1, args.height, args.width, 3), use_ema=False
        )
    )(0)
    step = jax.jit(
        functools.partial(det_steps.det_train_step, model=model, tx=tx, schedule=schedule, ema_decay=0.0),
        donate_argnums=0,
    )
    batch = jax.device_put(random_batch(args, np.random.default_rng(0)))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    print(f"compiled in {compile_s:.1f} s", flush=True)
    for _ in range(args.warmup):
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    result = {
        "model": args.model,
        "shape": [args.batch, args.height, args.width],
        "dtype": args.dtype,
        "device": str(jax.devices()[0].device_kind),
        "step_ms": round(ms, 2),
        "img_per_s": round(args.batch * 1000 / ms, 2),
        "compile_s": round(compile_s, 1),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
