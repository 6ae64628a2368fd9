"""Trains a model: `python train.py --config=configs/<experiment>.py --workdir=DIR`.

Any config field can be overridden (`--config.optim.lr=1e-3`); an unknown one fails at once.
Re-running the same command resumes from DIR's latest checkpoint. The last line printed is the
final evaluation as one JSON object. On SIGTERM (a TPU / SLURM preemption notice) the run finishes
its step, saves a checkpoint, waits for it and exits with status 0.

Several processes (hosts): SLURM, Open MPI and Cloud TPU pod slices are detected; otherwise pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` to every process. Only
process 0 writes logs and metrics; every process writes its shards of each checkpoint.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from biformer_jax import cli, data, tasks
from biformer_jax.data.detection.coco import CocoFormatError
from biformer_jax.data.segmentation.sources import SegDataError
from biformer_jax.models.from_config import CheckpointMismatchError
from biformer_jax.training import checkpoint, checkpoint_manager, distributed, preemption, train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    list(distributed.MODES),
    "jax.distributed.initialize: 'auto' when SLURM / Open MPI / Cloud TPU or the flags below say "
    "the launch is multi-process, 'on' always (JAX's own cluster detection), 'off' never.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoint_manager.quiet_orbax_logging()
    distributed.initialize(
        _DISTRIBUTED.value,
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    if jax.process_index() > 0:  # one log for the run: process 0's
        logging.set_verbosity(logging.WARNING)
    logging.info("JAX devices: %s", jax.devices())
    try:
        metrics = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value, tasks.get(_CONFIG.value))
    except preemption.Preempted as stop:
        logging.warning("%s", stop)
        raise  # SystemExit(0)
    except (
        data.DatasetNotPreparedError,
        checkpoint.CheckpointError,
        CheckpointMismatchError,
        train_lib.NonFiniteLossError,
        SegDataError,
        CocoFormatError,
    ) as e:
        # Bad input, not a bug: the message says what is wrong and what to do; no traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if jax.process_index() == 0:
        print(train_lib.summary_line(metrics), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
