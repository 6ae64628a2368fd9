"""Evaluates a checkpoint: `python eval.py --config=configs/<experiment>.py --checkpoint=DIR`.

DIR is a converter checkpoint, a train.py step directory or a train.py workdir (its latest
checkpoint). Reports top-1, top-5 and loss on the config's eval split for the weights and, when
the checkpoint has them, the EMA weights. The last line printed is one JSON object, also written
to DIR/eval_results.json (the step directory for a workdir).
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from biformer_jax import data
from biformer_jax.training import checkpoint, eval_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint directory or train.py workdir.")
flags.mark_flags_as_required(["config", "checkpoint"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoint.quiet_orbax_logging()
    try:
        results = eval_lib.evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value)
    except (data.DatasetNotPreparedError, checkpoint.CheckpointMismatchError, FileNotFoundError) as e:
        # Bad input, not a bug: the message says what is wrong and what to do; no traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(results, sort_keys=True), flush=True)


if __name__ == "__main__":
    app.run(main)
