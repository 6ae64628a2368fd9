"""Evaluates a checkpoint: `python eval.py --config=configs/<experiment>.py --checkpoint=DIR`.

DIR is a converter checkpoint, a train.py step directory or a train.py workdir (its latest
checkpoint), local or gs://, s3://. Reports top-1, top-5 and loss on the config's eval split for
the weights and, when the checkpoint has them, the EMA weights; for a segmentation config (configs/seg/),
mmseg's per-class IoU / Acc table and mIoU, mAcc, aAcc (`--config.eval.mode=whole|slide`,
`--config.eval.multi_scale_flip=True`). The last line printed is one JSON object; it is printed before
anything is written, then saved to --output (default DIR/eval_results.json, the step directory for a
workdir). Where that cannot be written (a read-only or removed checkpoint) a warning says so on stderr
and the exit status stays 0.
"""

import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from biformer_jax import cli, data, tasks
from biformer_jax.data.detection.coco import CocoFormatError
from biformer_jax.data.segmentation.sources import SegDataError
from biformer_jax.models.from_config import CheckpointMismatchError
from biformer_jax.training import checkpoint, checkpoint_manager

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory or train.py workdir.")
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "Where to write the results JSON (a file, or a directory for eval_results.json); default: "
    "the evaluated checkpoint's directory. 'none': do not write.",
)
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoint_manager.quiet_orbax_logging()
    try:
        results = tasks.get(_CONFIG.value).evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value)
    except (
        data.DatasetNotPreparedError,
        checkpoint.CheckpointError,
        CheckpointMismatchError,
        FileNotFoundError,
        SegDataError,
        CocoFormatError,
    ) as e:
        # Bad input, not a bug: the message says what is wrong and what to do; no traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(results, sort_keys=True), flush=True)  # first: nothing below can lose it
    output = _OUTPUT.value or results["checkpoint"]
    if jax.process_index() == 0 and output.lower() != "none":
        try:
            tasks.write_results(output, results)
        except Exception as e:  # noqa: BLE001  (read-only, removed, remote: the result is printed above)
            print(
                f"warning: could not write the results to {output} ({type(e).__name__}: {e}); they are the JSON "
                "line printed above. Choose a writable place with --output.",
                file=sys.stderr,
                flush=True,
            )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
