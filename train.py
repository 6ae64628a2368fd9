"""Trains a model: `python train.py --config=configs/<experiment>.py --workdir=DIR`.

Any config field can be overridden (`--config.optim.lr=1e-3`); an unknown one fails at once.
Re-running the same command resumes from DIR's latest checkpoint. The last line printed is the
final evaluation as one JSON object.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from biformer_jax import checkpoint, data, train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoint.quiet_orbax_logging()
    logging.info("JAX devices: %s", jax.devices())
    try:
        metrics = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (data.DatasetNotPreparedError, checkpoint.CheckpointMismatchError, train_lib.NonFiniteLossError) as e:
        # Bad input, not a bug: the message says what is wrong and what to do; no traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(train_lib.summary_line(metrics), flush=True)


if __name__ == "__main__":
    app.run(main)
