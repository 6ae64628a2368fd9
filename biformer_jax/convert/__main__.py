"""Command-line converter: an official PyTorch `.pth` -> an Orbax checkpoint of Flax variables.

    python -m biformer_jax.convert --model=biformer_small --input=biformer_small_best.pth \
        --output=ckpts/biformer_small_in1k

The input may be a raw state_dict, an official training checkpoint `{"model": ...,
"model_ema": ...}` or an mmsegmentation checkpoint `{"state_dict": ..., "meta": ...}` (keys
`backbone.`, `neck.`, `decode_head.`, `auxiliary_head.`; convert it with a segmentation model
name such as `--model=upernet_biformer_small`). `--weights` picks the entry; by default
`model` if present, else `state_dict`. An mmseg checkpoint's class names (`meta["CLASSES"]`)
are kept in biformer_jax.json as `classes`. Every key is checked against the model first:
a mismatch lists the missing / unexpected / mis-shaped keys and writes nothing. The output is
written to a temporary directory and renamed into place, so it is complete or absent.
Needs PyTorch (CPU build is enough) for reading the file; nothing else in the package does.
"""

from __future__ import annotations

import argparse
import json
import sys

from biformer_jax import models
from biformer_jax.convert import CheckpointMismatchError, from_torch_state_dict
from biformer_jax.convert.files import ConversionError, read_torch_checkpoint_with_meta, save_converted


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m biformer_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"create_model name: {', '.join(models.list_models())}")
    p.add_argument("--model-kwargs", default="{}", help="JSON overrides for create_model, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--input", required=True, help="the official .pth file")
    p.add_argument("--output", required=True, help="directory to create (must not exist)")
    p.add_argument(
        "--weights",
        default="auto",
        choices=("auto", "model", "model_ema", "state_dict"),
        help="which entry of a training checkpoint to convert (ignored for a raw state_dict); "
        "auto: model if present, else state_dict (mmseg)",
    )
    p.add_argument(
        "--non-strict",
        action="store_true",
        help="ignore keys the model has no place for (e.g. a classifier when features_only=True)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        print(f"error: --model-kwargs is not valid JSON ({e}): {args.model_kwargs!r}", file=sys.stderr)
        return 2
    try:
        model = models.create_model(args.model, **kwargs)
        state_dict, entry, extra = read_torch_checkpoint_with_meta(args.input, args.weights)
        variables = from_torch_state_dict(state_dict, model, strict=not args.non_strict)
        meta = {
            "format": "biformer_jax.variables/1",
            "model": args.model,
            "model_kwargs": kwargs,
            "source": str(args.input),
            "weights": entry,
            **extra,
        }
        save_converted(args.output, variables, meta)
    except (ConversionError, CheckpointMismatchError, ValueError, TypeError) as e:
        print(f"error: {e}\nNothing was written.", file=sys.stderr)
        return 1
    n = sum(v.size for v in _leaves(variables["params"]))
    print(f"wrote {args.output}: {args.model} ({n:,} parameters) from {args.input} [{entry}]")
    return 0


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


if __name__ == "__main__":
    sys.exit(main())
