"""Detection throughput and memory: RetinaNet and Mask R-CNN inference, and the task's training step, at one shape.

    python benchmarks/detection.py --model=retinanet_biformer_micro --batch=2 --height=96 --width=128
    # the issue's figures: 800x1333 images (padded to 800x1344 by the pipeline's Pad 32), batch 1
    python benchmarks/detection.py --mode=infer --model=retinanet_biformer_small --batch=1 \
        --height=800 --width=1344 --warmup=1 --rounds=2 --steps=1 --official_repo=/tmp/official_biformer
    python benchmarks/detection.py --mode=train --model=retinanet_biformer_small --batch=1 \
        --height=800 --width=1344 --warmup=1 --rounds=1 --steps=1 --official_repo=/tmp/official_biformer
    python benchmarks/detection.py --mode=infer --model=maskrcnn_biformer_small --batch=1 \
        --height=800 --width=1344 --warmup=1 --rounds=2 --steps=1 --official_repo=/tmp/official_biformer \
        --official_python=/tmp/tvenv/bin/python

`--mode=train` (default): the detection task's train step (tasks/detection/steps.py) on random
images and a few random boxes per image at (--height, --width) (a bucket shape of the pipeline:
one compile per shape): backbone + FPN + RetinaHead forward with drop path, the RetinaNet loss
(max-IoU assignment, focal + L1), backward and AdamW with the official settings, the backbone's
BatchNorms frozen, loss groups of 2 images. `--mode=infer`: backbone + FPN + RetinaHead forward
to the head's outputs (all levels' class logits and box deltas), without box decoding or NMS,
with weights made on the host and compiled as eval.py runs it (ahead of time, the compiler's
freed memory released). With a Mask R-CNN (`maskrcnn_*`, inference only) `--mode=infer` is the
whole test path, `maskrcnn.detect`: backbone + FPN + RPN, proposals (top 1000 per level, NMS 0.7),
RoIAlign + box head, softmax, class-wise NMS 0.5 (100 kept), the mask head on the detections and
the masks pasted into the image.

`--official_repo` (a checkout of rayleizhu/BiFormer, fetched outside this repository; BiFormer
models only) times the official `BiFormer` as its detection configs build it (`BiFormer_mm`:
extra LayerNorm2d per stage, BatchNorms in eval mode) under a PyTorch FPN + RetinaHead + RetinaNet
loss of the same shapes (benchmarks/torch_retinanet.py; mmdet does not install here) with AdamW
(lr 1e-4, weight decay 1e-4), on the same shape and number of boxes, in a worker process that
imports neither JAX nor this package, alternating rounds with ours so both see the same load.
With a Mask R-CNN the worker is benchmarks/torch_maskrcnn.py (FPN, RPN, RoI heads and mask pasting
of mmdet 2.11's test path, RoIAlign and NMS from torchvision's CPU kernels, as mmcv's): run it
under a Python with torch + torchvision (`--official_python`; see that file).

Our peak RSS is this process's high-water mark (imports and compilation included;
import_rss_bytes is the mark after the imports: train mode imports the task, which pulls in
TensorFlow); the official one is its worker's. Prints each round, then one JSON line: step_ms
(median), img_per_s, compile_s, peak_rss_bytes, the compiled program's memory analysis, and with
--official_repo official_img_per_s, official_step_ms, official_peak_rss_bytes, speedup (median
over rounds of official / ours step time) and rss_ratio (ours / official).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's biformer_jax first

import segmentation  # noqa: E402  (benchmarks/segmentation.py: host_variables)
from timing import DTYPES, CompiledBench, alternate_rounds  # noqa: E402  (benchmarks/timing.py)

from biformer_jax import models  # noqa: E402
from biformer_jax.host_memory import compile_for_inference  # noqa: E402

WORKERS = {  # the official detector's worker by our model's class
    "RetinaNet": Path(__file__).resolve().with_name("torch_retinanet.py"),
    "MaskRCNN": Path(__file__).resolve().with_name("torch_maskrcnn.py"),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="retinanet_biformer_micro")
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--num_classes", type=int, default=80)
    ap.add_argument("--max_boxes", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--official_repo", default=None, help="checkout of rayleizhu/BiFormer to time alongside")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the official model")
    ap.add_argument(
        "--official_python",
        default=sys.executable,
        help="the Python that runs the official worker (torch_maskrcnn.py needs torchvision)",
    )
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


def task_modules():
    """The task's optimiser and step, imported on demand: they pull in TensorFlow (~0.6 GB
    resident, through the task registry), which inference never needs."""
    from biformer_jax.tasks.detection import optim as det_optim
    from biformer_jax.tasks.detection import steps as det_steps
    from biformer_jax.training.train_state import init_train_state
    from configs.det import common

    return det_optim, det_steps, init_train_state, common


class OursDet(CompiledBench):
    """Our RetinaNet's train step or inference, compiled ahead of time; `step()` runs one."""

    def __init__(self, args, model):
        batch = jax.device_put(random_batch(args, np.random.default_rng(0)))
        t0 = time.perf_counter()
        if args.mode == "train":
            self._init_train(args, model, batch)
        else:
            variables = segmentation.host_variables(model, np.random.default_rng(0))
            if type(model).__name__ == "MaskRCNN":
                from biformer_jax.models.detection import maskrcnn

                fn = jax.jit(lambda v, x: maskrcnn.detect(model, v, x))
            else:
                fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
            self.compiled = compile_for_inference(fn, variables, batch["image"])
            self._run = lambda: self.compiled(variables, batch["image"])
        self.compile_s = time.perf_counter() - t0
        print(f"compiled in {self.compile_s:.1f} s", flush=True)

    def _init_train(self, args, model, batch) -> None:
        det_optim, det_steps, init_train_state, common = task_modules()
        tx, schedule, _ = det_optim.make_optimizer(common.get_base_config(args.model), steps_per_epoch=1000)
        init = functools.partial(
            init_train_state, model=model, tx=tx, input_shape=(1, args.height, args.width, 3), use_ema=False
        )
        self.state = jax.jit(init)(0)
        step = jax.jit(
            functools.partial(det_steps.det_train_step, model=model, tx=tx, schedule=schedule, ema_decay=0.0),
            donate_argnums=0,
        )
        self.compiled = step.lower(self.state, batch).compile()

        def run():
            self.state, metrics = self.compiled(self.state, batch)
            return metrics

        self._run = run


class OfficialDet:
    """The official BiFormer under a worker's neck and heads (torch_retinanet / torch_maskrcnn) in its own process."""

    def __init__(self, args, worker: Path, backbone_args: dict):
        cmd = [
            args.official_python,
            str(worker),
            "--serve",
            f"--repo={args.official_repo}",
            f"--backbone_args={json.dumps(backbone_args)}",
            f"--mode={args.mode}",
            f"--batch={args.batch}",
            f"--height={args.height}",
            f"--width={args.width}",
            f"--num_classes={args.num_classes}",
            f"--max_boxes={args.max_boxes}",
            f"--threads={args.threads}",
        ]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, word: str) -> str:
        line = self._proc.stdout.readline().strip()
        if word and line != word:
            self._proc.kill()
            raise RuntimeError(f"the official benchmark worker answered {line!r}, not {word!r} (its stderr is above)")
        return line

    def _send(self, word: str) -> None:
        self._proc.stdin.write(word + "\n")
        self._proc.stdin.flush()

    def step(self) -> None:
        self._send("step")
        self._expect("done")

    def close(self) -> int:
        """Stops the worker; returns its peak RSS in bytes."""
        self._send("stop")
        rss = int(self._expect(""))
        self._proc.wait(timeout=60)
        return rss


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.mode == "train":
        task_modules()
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    kw = {"num_classes": args.num_classes}
    if args.dtype != "float32":
        kw["dtype"] = DTYPES[args.dtype]
    model = models.create_model(args.model, **kw)
    family = type(model).__name__
    if family == "MaskRCNN" and args.mode != "infer":
        raise SystemExit(f"{args.model}: the Mask R-CNN benchmark times inference only; pass --mode=infer.")
    official = None
    if args.official_repo:
        if model.backbone != "biformer" or family not in WORKERS:
            raise SystemExit(
                "--official_repo times the official BiFormer: pass a retinanet_biformer_* or maskrcnn_biformer_* model."
            )
        if family == "MaskRCNN" and args.batch != 1:
            raise SystemExit("--official_repo with a Mask R-CNN times one image per step: pass --batch=1.")
        official = OfficialDet(args, WORKERS[family], model.backbone_config)
    ours = OursDet(args, model)
    ours_s, theirs_s = alternate_rounds(
        ours, official, warmup=args.warmup, rounds=args.rounds, steps=args.steps, batch=args.batch
    )
    step_s = statistics.median(ours_s)
    result = {
        "model": args.model,
        "mode": args.mode,
        "shape": [args.batch, args.height, args.width],
        "dtype": args.dtype,
        "device": str(jax.devices()[0].device_kind),
        "step_ms": round(1e3 * step_s, 2),
        "img_per_s": round(args.batch / step_s, 3),
        "compile_s": round(ours.compile_s, 1),
        **ours.memory(),
        "import_rss_bytes": import_rss,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if official is not None:
        result["official_peak_rss_bytes"] = official.close()
        result["official_step_ms"] = round(1e3 * statistics.median(theirs_s), 2)
        result["official_img_per_s"] = round(args.batch / statistics.median(theirs_s), 3)
        result["speedup"] = round(statistics.median([t / o for o, t in zip(ours_s, theirs_s)]), 3)
        result["rss_ratio"] = round(result["peak_rss_bytes"] / result["official_peak_rss_bytes"], 3)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
