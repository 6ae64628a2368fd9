"""Runs a grid of config overrides, one workdir each, then writes a summary table.

    python sweep.py --config=configs/quickstart.py --sweep=configs/sweeps/quickstart_lr.py \
        --workdir=workdirs/sweep_lr

Each run trains in WORKDIR/<overrides> (resumed if it exists); WORKDIR/summary.md and
WORKDIR/summary.csv list every run's final and best eval metrics. See biformer_jax/training/sweeps.py for
the sweep file format. A failed run does not stop the others; the command then exits with status 1,
each failure's traceback in WORKDIR/<overrides>/failure.txt.
"""

import sys

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from biformer_jax import cli, tasks
from biformer_jax.training import checkpoint_manager, sweeps, train_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Base experiment config (configs/*.py[:arg]).", lock_config=True
)
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep(h).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory: one sub-directory per run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only list the runs.")
flags.mark_flags_as_required(["config", "sweep", "workdir"])


def _train(config, workdir: str):
    """One run of the sweep, as its config's task."""
    return train_lib.train_and_evaluate(config, workdir, tasks.get(config))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    checkpoint_manager.quiet_orbax_logging()
    points = sweeps.load_sweep(_SWEEP.value)
    for point in points:
        sweeps.apply_overrides(_CONFIG.value, point)  # fail on a bad field before any training
        logging.info("run %s", sweeps.run_name(point))
    if _DRY_RUN.value:
        print("\n".join(sweeps.run_name(p) for p in points))
        return
    rows = sweeps.run_sweep(_CONFIG.value, points, _WORKDIR.value, _train)
    md_path, _ = sweeps.write_summary(_WORKDIR.value, rows)
    print(epath.Path(md_path).read_text(), flush=True)
    failed = [row["run"] for row in rows if row["status"] != "ok"]
    if failed:
        print(
            f"error: {len(failed)} of {len(rows)} runs failed ({', '.join(failed)}); each one's traceback is in "
            f"its workdir's {sweeps.FAILURE_FILE} (see the status column above).",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
