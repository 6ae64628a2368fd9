"""The Orbax CheckpointManager of a train.py workdir: retention, item handlers, closing, logging.

`create_manager` keeps the last `checkpoint.keep` steps and the `checkpoint.keep_best` best by the
task's metric under WORKDIR/checkpoints/ (what `checkpoint.save_train_state` writes and
`checkpoint.restore_train_state` reads); `close_manager` waits for every background write.
`quiet_orbax_logging` is for the entry points.
"""

from __future__ import annotations

import logging as std_logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from biformer_jax.storage import as_path

CHECKPOINT_SUBDIR = "checkpoints"


def lower_is_better(metric: str) -> bool:
    """Whether a smaller `metric` is better: losses and errors are, accuracies ("top1", "top5") are not."""
    leaf = metric.rsplit("/", 1)[-1].lower()
    return "loss" in leaf or "err" in leaf


def create_manager(workdir: str | os.PathLike, ckpt_cfg, *, best_metric: str) -> ocp.CheckpointManager:
    """Keeps the last `ckpt_cfg.keep` checkpoints and the `ckpt_cfg.keep_best` best by `best_metric` (if set).

    The best is the highest value, or the lowest for a loss or error (`lower_is_better`).
    """
    policies: list = [checkpoint_managers.LatestN(n=max(1, int(ckpt_cfg.keep)))]
    if ckpt_cfg.keep_best and best_metric:
        policies.append(
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric],
                reverse=lower_is_better(best_metric),  # BestN keeps the end of the sorted list
                n=int(ckpt_cfg.keep_best),  # True counts as 1
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=bool(ckpt_cfg.asynchronous),
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(
        as_path(workdir) / CHECKPOINT_SUBDIR,
        item_handlers={
            **{name: _array_tree_handler() for name in ARRAY_ITEMS},
            "meta": ocp.JsonCheckpointHandler(),
        },
        options=options,
    )


def close_manager(manager: ocp.CheckpointManager) -> None:
    """Waits for every write and background task of `manager`, then closes it.

    CheckpointManager.close() waits for saves but not for the temporary-directory cleanup it
    starts in its constructor (only save() awaits that): a run that fails before its first save
    (a bad init_from, say) would leave that thread running into interpreter shutdown, which prints
    a traceback ("cannot schedule new futures after interpreter shutdown") under the one-line error.
    """
    cleanup = getattr(manager, "_cleanup_tmp_directory_future", None)  # Orbax 0.12: no public handle
    if cleanup is not None:
        cleanup.result()
        manager._cleanup_tmp_directory_future = None
    manager.wait_until_finished()
    manager.close()


ARRAY_ITEMS = ("variables", "ema_variables", "train")


def _array_tree_handler() -> ocp.PyTreeCheckpointHandler:
    """StandardSave's handler and format, with replica-parallel writes off except on TPU.

    Orbax splits the write of a replicated array across its replicas by default, compiling a
    small slicing program per array shape and device on the first save: on an 8-device CPU
    mesh the first save() of a micro model's state blocked training ~10 s (later saves ~1 s),
    for nothing (the replicas share host memory). Orbax itself turns it off on GPU (when
    JAX_PLATFORMS says so); here it is off on CPU and GPU and left to Orbax on TPU. Without
    replica-parallel every replicated array is written once, by the process holding replica 0.

    The array handler has no array-metadata store: that store only records typed PRNG keys,
    which train states do not hold (their `rng` is raw key data), and restoring reads the
    same files either way.
    """
    replica_parallel = None if jax.default_backend() == "tpu" else False  # None: Orbax's default
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, ocp.type_handlers.ScalarHandler()),
        (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=replica_parallel)),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class _OrbaxInfoFilter(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logging() -> None:
    """Drops Orbax's INFO lines (dozens per save) from the absl log; its warnings stay."""
    logger = std_logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxInfoFilter) for f in logger.filters):
        logger.addFilter(_OrbaxInfoFilter())
