"""`python -m biformer_jax.visualize {routes,gradcam,erf} --checkpoint=DIR ... --out=PNG`.

    # routed regions and token attention of a few queries in the last block of stage 2
    python -m biformer_jax.visualize routes --checkpoint=DIR --image=PATH [--query=y,x ...] \\
        [--stage=2 --block=-1] [--per_head] --out=routes.png
    # Grad-CAM of the predicted class (or --class_index) at every stage's output (or --stage)
    python -m biformer_jax.visualize gradcam --checkpoint=DIR --image=PATH --out=gradcam.png
    # effective receptive field of stage 2's centre unit over 16 images, checkpoints side by side
    python -m biformer_jax.visualize erf --checkpoint=A --checkpoint=B [--random_model=biformer_tiny] \\
        --images=FOLDER --num_images=16 --size=224 --stage=2 --out=erf.png

--checkpoint: a train.py workdir or step directory, or a converter output. --image: a file, or
sklearn:china.jpg / sklearn:flower.jpg / sklearn:digit:K (no download). Inputs are resized to
--size (H or H,W; default: as they are) and normalised with --mean/--std (default ImageNet's;
the quickstart's digits use 0.5,0.5,0.5 for both).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from biformer_jax.plot import save_figure
from biformer_jax.training import checkpoint, checkpoint_manager
from biformer_jax.visualize import drawing, inputs, routes, saliency


def _pair(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{what}={text!r}: give integers separated by a comma.") from None
    return values


def _floats(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise ValueError(f"{text!r}: give three values (R,G,B).")
    return values


def _size(text: str | None):
    if not text:
        return None
    values = _pair(text, "--size")
    if len(values) not in (1, 2) or min(values) <= 0:
        raise ValueError(f"--size={text!r}: give H or H,W (positive).")
    return values * 2 if len(values) == 1 else values


def _default_queries(height: int, width: int) -> list[tuple[int, int]]:
    return [(height // 4, width // 4), (height // 2, width // 2), (3 * height // 4, 3 * width // 4)]


def cmd_routes(args) -> str:
    loaded = inputs.load_checkpoint(args.checkpoint, expect_model=args.model, ema=args.ema)
    image = inputs.read_image(args.image, _size(args.size))
    x = inputs.normalize(image[None], _floats(args.mean), _floats(args.std))
    queries = [_pair(q, "--query") for q in args.query] or _default_queries(*image.shape[:2])
    for q in queries:
        if len(q) != 2:
            raise ValueError(f"--query={','.join(map(str, q))}: give y,x (pixels).")
    results = routes.query_routes(loaded.model, loaded.variables, x, args.stage, args.block, queries)
    fig = drawing.routes_figure(image, results, per_head=args.per_head)
    save_figure(fig, args.out)
    lines = []
    for row in results:
        for qr in row:
            lines.append(
                f"{qr.module} query (y={qr.query[0]}, x={qr.query[1]}) token {qr.token} region {qr.region}: "
                f"routes {qr.routes.tolist()} (weights {np.round(qr.weights, 3).tolist()})"
            )
    return "\n".join(lines)


def cmd_gradcam(args) -> str:
    loaded = inputs.load_checkpoint(args.checkpoint, expect_model=args.model, ema=args.ema)
    image = inputs.read_image(args.image, _size(args.size))
    x = inputs.normalize(image[None], _floats(args.mean), _floats(args.std))
    stages = [int(s) for s in args.stage.split(",")] if args.stage else sorted(inputs.stage_blocks(loaded.variables))
    cams, cls, logits = [], None, None
    for stage in stages:
        cam, cls, logits = saliency.grad_cam(loaded.model, loaded.variables, x, stage, args.class_index)
        cams.append((stage, cam))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    fig = drawing.gradcam_figure(image, cams, cls, loaded.label)
    save_figure(fig, args.out)
    return f"class {cls} (p={probs[cls]:.3f}; predicted {int(np.argmax(logits))}), stages {stages}"


def cmd_erf(args) -> str:
    models = [inputs.load_checkpoint(c, ema=args.ema) for c in args.checkpoint]
    models += [inputs.random_model(name, seed=0) for name in args.random_model]
    if not models:
        raise ValueError("erf needs at least one --checkpoint or --random_model.")
    size = _size(args.size)
    if args.images == "sklearn:digits":  # the first --num_images handwritten digits
        specs = [f"sklearn:digit:{k}" for k in range(args.num_images)]
        size = size or (32, 32)
    elif args.images.startswith("sklearn:"):
        specs = args.images.split("+")
        if size is None:
            raise ValueError("--size is needed to stack sklearn: samples of different sizes.")
    else:
        specs = inputs.folder_images(args.images, args.num_images)
        if size is None:
            size = inputs.read_image(specs[0]).shape[:2]  # the first image's size for all
    images = np.stack([inputs.read_image(s, size) for s in specs])
    x = inputs.normalize(images, _floats(args.mean), _floats(args.std))
    maps, lines = [], []
    for m in models:
        heat = saliency.erf(m.model, m.variables, x, args.stage)
        fractions = saliency.mass_fractions(heat)
        maps.append((m.label, heat, fractions))
        text = ", ".join(f"{int(100 * t)}% of the mass in {100 * f:.2f}% of the image" for t, f in fractions.items())
        lines.append(f"{m.label}: {text}")
    save_figure(drawing.erf_figure(maps, args.stage, len(specs)), args.out)
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m biformer_jax.visualize", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--size", default=None, help="resize inputs to H or H,W pixels")
    common.add_argument("--mean", default=",".join(map(str, inputs.IMAGENET_MEAN)))
    common.add_argument("--std", default=",".join(map(str, inputs.IMAGENET_STD)))
    common.add_argument("--ema", action="store_true", help="the EMA weights of a train checkpoint")
    common.add_argument("--out", required=True, help="the PNG to write")
    r = sub.add_parser("routes", parents=[common], help="routed regions and token attention of queries")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--model", default=None, help="refuse a checkpoint of any other model")
    r.add_argument("--image", required=True)
    r.add_argument("--query", action="append", default=[], help="y,x in input pixels (repeatable)")
    r.add_argument("--stage", type=int, default=2)
    r.add_argument("--block", type=int, default=-1)
    r.add_argument("--per_head", action="store_true", help="one panel per head instead of their mean")
    g = sub.add_parser("gradcam", parents=[common], help="Grad-CAM of a class at stage outputs")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--model", default=None, help="refuse a checkpoint of any other model")
    g.add_argument("--image", required=True)
    g.add_argument("--stage", default="", help="stages, comma separated (default: all)")
    g.add_argument("--class_index", type=int, default=None, help="default: the predicted class")
    e = sub.add_parser("erf", parents=[common], help="effective receptive field, models side by side")
    e.add_argument("--checkpoint", action="append", default=[], help="repeatable")
    e.add_argument("--random_model", action="append", default=[], help="a model name at random init (repeatable)")
    e.add_argument("--images", required=True, help="a folder of images, sklearn:digits, or sklearn:A+sklearn:B")
    e.add_argument("--num_images", type=int, default=16)
    e.add_argument("--stage", type=int, default=2)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    checkpoint_manager.quiet_orbax_logging()
    command = {"routes": cmd_routes, "gradcam": cmd_gradcam, "erf": cmd_erf}[args.command]
    try:
        summary = command(args)
    except (ValueError, FileNotFoundError, checkpoint.CheckpointMismatchError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)  # bad input: the message says what to fix
        return 1
    print(summary)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
