"""Exports a checkpoint for serving.

    python -m biformer_jax.export --checkpoint=DIR --out=model.stablehlo            # jax.export
    python -m biformer_jax.export --checkpoint=DIR --out=model.onnx --format=onnx  # ONNX

DIR is any checkpoint this project loads. Writes OUT and, beside it, OUT.json: the
preprocessing (resize, crop, mean/std, NHWC float32 input), class names and the check's errors.
The StableHLO batch is symbolic, and so are height and width for models that pad to their region
grid (auto_pad BiFormer, DeBiFormer; --fixed_size keeps the image size; see export/stablehlo.py).
Before writing, the exported model is run at batch 1 and 3 against model.apply (StableHLO within
1e-6, at three sizes when symbolic; ONNX via onnxruntime within 2e-6, relative L2 error); both
files are written to temporary names and renamed into place, so they are complete or absent.
Prints the spec's check as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from biformer_jax.export import common
from biformer_jax.tasks.classification import inference
from biformer_jax.training import checkpoint, checkpoint_manager

FORMATS = ("stablehlo", "onnx")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m biformer_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or train.py workdir")
    p.add_argument("--out", required=True, help="the artifact to write (its spec goes beside it as .json)")
    p.add_argument("--format", default="stablehlo", help=f"one of {', '.join(FORMATS)} (default stablehlo)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of a train checkpoint")
    p.add_argument(
        "--attn_impl",
        default="auto",
        choices=("auto", "gather", "masked", "chunked"),
        help="routed attention in the artifact (the same function; auto picks per stage by shape)",
    )
    p.add_argument(
        "--dwconv_impl",
        default="conv",
        choices=("conv", "shift"),
        help="depthwise convolution in the artifact: conv (XLA / ONNX grouped convolution) or shift (sums of shifts)",
    )
    p.add_argument(
        "--fixed_size",
        action="store_true",
        help="stablehlo: keep height/width at the checkpoint's image size even for a model that pads to its "
        "region grid (auto_pad BiFormer, DeBiFormer), whose height/width are symbolic by default",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files at --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.format not in FORMATS:
        print(f"error: --format={args.format!r} is not one of {', '.join(FORMATS)}.", file=sys.stderr)
        return 2
    checkpoint_manager.quiet_orbax_logging()
    try:
        loaded = inference.load(
            args.checkpoint,
            ema=args.ema,
            model_overrides={"attn_impl": args.attn_impl, "dwconv_impl": args.dwconv_impl},
        )
        if args.format == "onnx":
            from biformer_jax.export import onnx as exporter

            record = exporter.export_checkpoint(loaded, args.out, overwrite=args.overwrite)
        else:
            from biformer_jax.export import stablehlo as exporter

            symbolic = False if args.fixed_size else None  # None: symbolic where the model allows it
            record = exporter.export_checkpoint(loaded, args.out, overwrite=args.overwrite, symbolic_size=symbolic)
    except (inference.InferenceInputError, checkpoint.CheckpointMismatchError, common.ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {"out": args.out, "spec": common.spec_path(args.out), "format": args.format, **record["check"]}
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
