"""Classifies images: `python predict.py --checkpoint=DIR IMAGES...`.

DIR is any checkpoint this project loads (a train.py workdir or step directory, a converted
official checkpoint). IMAGES are files, folders (every image file below them) or globs. Each image
goes through the checkpoint's eval transform (shorter side resized, center crop, normalised; so
any size works) and the model in batches of --batch_size; the top --top_k classes are printed,
one JSON object per image by default ({"path", "labels", "probabilities", "classes"}), or CSV
with --format=csv. Class names: the checkpoint's dataset (e.g. "0".."9" for the quickstart's
digits), TFDS's imagenet2012 WordNet ids for 1000-class checkpoints, or --labels=FILE.

A detection checkpoint (a RetinaNet, e.g. from configs/det/) prints one JSON object per image
instead, {"path", "detections": [{"box": [x1, y1, x2, y2], "score", "label", "class"}, ...]} with
the scores >= --score_thr, and with --draw=DIR writes DIR/<name>_det.png with the boxes drawn
(biformer_jax/tasks/detection/predict.py). A segmentation checkpoint is refused with the command
that predicts with it.

An image that cannot be read is named on stderr and skipped; the exit status is then 1.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from biformer_jax import tasks
from biformer_jax.tasks.classification import inference
from biformer_jax.tasks.classification import predict as predict_lib
from biformer_jax.training import checkpoint, checkpoint_manager

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory or train.py workdir.")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "The experiment config the checkpoint was trained with (only for checkpoints that do not "
    "record their preprocessing).",
    lock_config=True,
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes reported per image.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_FORMAT = flags.DEFINE_enum("format", "json", list(predict_lib.FORMATS), "json: one object per line; csv.")
_EMA = flags.DEFINE_bool("ema", False, "Use the EMA weights of a train checkpoint.")
_LABELS = flags.DEFINE_string("labels", None, "A text file with one class name per line, in class order.")
_SCORE_THR = flags.DEFINE_float("score_thr", 0.3, "Detection checkpoints: report boxes scoring at least this.")
_DRAW = flags.DEFINE_string("draw", None, "Detection checkpoints: a folder for the images with their boxes drawn.")
flags.mark_flags_as_required(["checkpoint"])


def _read_labels(path):
    try:
        with open(path) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise inference.InferenceInputError(f"--labels={path}: {e}") from None


def _detect(paths):
    """predict.py for a detection checkpoint: the number of images that could not be read."""
    from biformer_jax.tasks.detection import predict as det_predict  # noqa: PLC0415  (detection only)

    if not 0.0 <= _SCORE_THR.value <= 1.0:
        raise inference.InferenceInputError(f"--score_thr={_SCORE_THR.value}: a score threshold is in [0, 1].")
    detector = det_predict.load(_CHECKPOINT.value, ema=_EMA.value)
    failed = 0
    for record in det_predict.predict(detector, paths, score_thr=_SCORE_THR.value, draw_dir=_DRAW.value):
        if "error" in record:
            failed += 1
            print(f"error: {record['error']}", file=sys.stderr, flush=True)
            continue
        print(json.dumps(record), flush=True)
    return failed


def main(argv):
    checkpoint_manager.quiet_orbax_logging()
    try:
        paths = predict_lib.list_images(argv[1:])
        _, record = inference.checkpoint_record(_CHECKPOINT.value)
        if tasks.for_record(record).name == "detection":
            failed = _detect(paths)
            if failed:
                print(f"error: {failed} of {len(paths)} images could not be read (named above).", file=sys.stderr)
                sys.exit(1)
            return
        if _DRAW.value:
            raise inference.InferenceInputError("--draw draws boxes: it takes a detection checkpoint.")
        names = _read_labels(_LABELS.value) if _LABELS.value else None
        loaded = inference.load(_CHECKPOINT.value, config=_CONFIG.value, ema=_EMA.value, class_names=names)
        records = predict_lib.predict(loaded, paths, batch_size=_BATCH.value, top_k=_TOP_K.value)
        failed = 0
        if _FORMAT.value == "csv":
            print(predict_lib.csv_header(min(_TOP_K.value, loaded.num_classes)), flush=True)
        for record in records:
            if "error" in record:
                failed += 1
                print(f"error: {record['error']}", file=sys.stderr, flush=True)
                continue
            line = predict_lib.format_csv(record) if _FORMAT.value == "csv" else predict_lib.format_json(record)
            print(line, flush=True)
    except (inference.InferenceInputError, checkpoint.CheckpointMismatchError) as e:
        # Bad input, not a bug: the message says what is wrong and what to do; no traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if failed:
        print(f"error: {failed} of {len(paths)} images could not be read (named above).", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
