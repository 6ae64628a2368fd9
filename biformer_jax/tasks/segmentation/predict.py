"""Colour-coded predictions for a folder of images: masks and overlays as PNG.

    python -m biformer_jax.tasks.segmentation.predict --config=configs/seg/upernet_biformer_s.py \\
        --checkpoint=workdirs/upernet_biformer_s --input=photos/ --output=predictions/ \\
        [--config.eval.multi_scale_flip=True] [--ema]

For every image <name>.<ext> of --input (sorted; JPEG, PNG, BMP, TIFF, WebP) it writes
<name>_mask.png (each pixel in its class's colour: the ADE20K palette for ADE20K's classes,
distinct generated colours otherwise), <name>_overlay.png (the image blended with the mask,
alpha --opacity) and <name>_labels.png (the class ids, 8-bit) into --output, with the test
pipeline and inference mode of the config's `eval` section. Existing files are not overwritten
unless --overwrite.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from biformer_jax import storage
from biformer_jax.data.segmentation import ade20k_meta
from biformer_jax.data.segmentation import config as seg_config
from biformer_jax.data.segmentation import transforms as seg_transforms
from biformer_jax.data.sources import IMAGE_EXTENSIONS, DatasetNotPreparedError
from biformer_jax.tasks.segmentation.checkpoint_eval import load_model_and_variables
from biformer_jax.tasks.segmentation.evaluate import local_copy
from biformer_jax.tasks.segmentation.inference import Segmenter
from biformer_jax.training import checkpoint, checkpoint_manager


def palette(class_names) -> np.ndarray:
    """(num_classes, 3) uint8 colours: ADE20K's for its 150 classes, else a fixed distinct sequence."""
    if tuple(class_names) == ade20k_meta.CLASS_NAMES:
        return np.asarray(ade20k_meta.PALETTE, np.uint8)
    colours = np.zeros((len(class_names), 3), np.uint8)
    for k in range(len(class_names)):  # the bit-interleaving colour map of PASCAL VOC's devkit
        c, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours[k] = (r, g, b)
    return colours


def colourise(pred: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8."""
    return colours[pred]


def overlay(image: np.ndarray, mask_rgb: np.ndarray, opacity: float) -> np.ndarray:
    return np.round(image * (1 - opacity) + mask_rgb * opacity).astype(np.uint8)


def predict_folder(
    config, checkpoint_path: str, input_dir: str, output_dir: str, *, ema=False, opacity=0.5, overwrite=False
):
    """Writes masks, overlays and label PNGs for every image of input_dir; returns the files written."""
    seg_config.validate_eval_config(config.eval)
    source = checkpoint.as_path(input_dir)  # local, gs://, s3:// (etils.epath)
    if not source.is_dir():
        raise FileNotFoundError(f"--input {input_dir}: no such directory.")
    inputs = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not inputs:
        raise FileNotFoundError(f"{input_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    out = checkpoint.as_path(output_dir)
    targets = [(p, [out / f"{p.stem}_{kind}.png" for kind in ("mask", "overlay", "labels")]) for p in inputs]
    existing = [t for _, paths in targets for t in paths if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{len(existing)} output files exist already (e.g. {existing[0]}); pass --overwrite.")
    model, names, _, variables, ema_variables = load_model_and_variables(config, checkpoint_path)
    if ema and ema_variables is None:
        raise FileNotFoundError(f"{checkpoint_path} holds no EMA weights; drop --ema.")
    segmenter = Segmenter(model, local_copy(ema_variables if ema else variables), config.eval)
    colours = palette(names)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, (mask_path, overlay_path, labels_path) in targets:
        with path.open("rb") as f:
            image = np.asarray(Image.open(f).convert("RGB"))
        views = [
            (
                r,
                f,
                seg_transforms.test_view(
                    image, config.eval.scale, r, config.eval.size_divisor, config.data.mean, config.data.std
                ),
            )
            for r, f in seg_config.eval_views(config.eval)
        ]
        pred = segmenter.predict(views, image.shape[:2])
        mask = colourise(pred, colours)
        for target, array in (
            (mask_path, mask),
            (overlay_path, overlay(image, mask, opacity)),
            (labels_path, pred.astype(np.uint8)),
        ):
            png = io.BytesIO()
            Image.fromarray(array).save(png, format="PNG")
            written.append(storage.write_atomically(target, png.getvalue()))  # never half a file
    return written


_CONFIG = config_flags.DEFINE_config_file("config", None, "Segmentation config (configs/seg/*.py).", lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory or train.py workdir.")
_INPUT = flags.DEFINE_string("input", None, "Folder of images.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the PNGs (created).")
_EMA = flags.DEFINE_bool("ema", False, "Use the checkpoint's EMA weights.")
_OPACITY = flags.DEFINE_float("opacity", 0.5, "Mask opacity in the overlays.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoint_manager.quiet_orbax_logging()
    for flag in (_CONFIG, _CHECKPOINT, _INPUT, _OUTPUT):
        if flag.value is None:
            raise app.UsageError(f"--{flag.name} is required.")
    try:
        written = predict_folder(
            _CONFIG.value,
            _CHECKPOINT.value,
            _INPUT.value,
            _OUTPUT.value,
            ema=_EMA.value,
            opacity=_OPACITY.value,
            overwrite=_OVERWRITE.value,
        )
    except (DatasetNotPreparedError, checkpoint.CheckpointMismatchError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"Wrote {len(written)} files to {_OUTPUT.value}.")


if __name__ == "__main__":
    app.run(main)
