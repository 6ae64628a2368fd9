"""Where a run's first state comes from, checked: the workdir's newest readable checkpoint,
config.resume or config.init_from, each against the config's architecture.

* `check_architecture`: a checkpoint records its model (`model`, `model_kwargs`); restoring it
  for a config that builds another architecture (even one with the same array shapes: `topks`,
  `n_win`, `pre_norm`, ...) raises `ArchitectureMismatchError` listing the differences.
* `restore_latest`: an unreadable newest step is set aside (renamed, never deleted) and the
  previous kept step restored.
* `check_own_checkpoint`: config.resume is refused once the workdir holds checkpoints of its
  own that did not start from it (a re-run of the same command after a preemption is fine).
* `init_from_ref`: config.init_from's checkpoint, whose architecture may differ only in the
  classifier width and in the fields named by config.init_from_overrides.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from biformer_jax.models import spec
from biformer_jax.training import checkpoint
from biformer_jax.training.train_state import TrainState


class ArchitectureMismatchError(checkpoint.CheckpointError):
    """A checkpoint was made for another architecture than the config's (same shapes or not)."""


def check_architecture(
    ref: checkpoint.CheckpointRef,
    configured: Mapping[str, Any],
    *,
    what: str,
    allow: Sequence[str] = (),
    hint: str = "",
) -> None:
    """Raises ArchitectureMismatchError listing every architecture field the checkpoint records differently.

    `configured` is the config's {"model", "model_kwargs"} record; fields in `allow` may differ.
    A checkpoint that records no model (made before checkpoints did) is not compared.
    """
    meta = checkpoint.load_meta(ref)
    if "model" not in meta:
        logging.warning("%s records no model: its architecture is not checked.", ref.path)
        return
    diffs = spec.differences(meta, configured, allow=allow)
    if diffs:
        raise ArchitectureMismatchError(
            f"The checkpoint {ref.path} ({what}) was made for another architecture than the config's "
            f"(checkpoint model {meta['model']!r}, config.model {configured['model']!r}):\n"
            + "\n".join(f"  {d}" for d in diffs)
            + "\nSet config.model / config.model_kwargs to the checkpoint's"
            + (f"; {hint}" if hint else "")
            + "."
        )


UNREADABLE_SUFFIX = ".unreadable"


def restore_latest(manager: ocp.CheckpointManager, abstract_state: TrainState) -> TrainState | None:
    """The newest readable checkpoint of the manager's directory (None when it has none).

    A step that cannot be read (`checkpoint.CheckpointReadError`: truncated or partly deleted files) is
    logged, renamed to `<step>.unreadable` beside the others (kept for inspection, never deleted,
    and out of the way of the step's next save) and the previous kept step is tried. A model or
    optimiser that does not fit (`CheckpointMismatchError`) is a configuration problem, the same
    for every step, and raised at once.
    """
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        ref = checkpoint.CheckpointRef("train", manager.directory / str(step), step)
        try:
            state = checkpoint.restore_train_state(ref, abstract_state)
        except checkpoint.CheckpointReadError as e:
            logging.warning("%s Trying the previous checkpoint.", e)
            unreadable.append(ref.path)
            continue
        _set_aside(unreadable, manager)
        return state
    _set_aside(unreadable, manager)
    if unreadable:
        raise checkpoint.CheckpointReadError(
            f"None of the checkpoints in {manager.directory} can be read (set aside as "
            f"*{UNREADABLE_SUFFIX}: {', '.join(p.name for p in unreadable)}). Remove them to start over, "
            "or use another --workdir."
        )
    return None


def _set_aside(paths: Sequence[epath.Path], manager: ocp.CheckpointManager) -> None:
    if not paths:
        return
    if jax.process_index() == 0:
        for path in paths:
            target = path.parent / f"{path.name}{UNREADABLE_SUFFIX}"
            while target.exists():
                target = path.parent / f"{target.name}-{uuid.uuid4().hex[:4]}"
            path.rename(target)
            logging.warning("Kept the unreadable checkpoint %s as %s.", path, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("biformer_jax.checkpoint.set_aside")
    manager.reload()


INIT_FROM_HINT = (
    "or, to fine-tune with other settings on purpose, name the fields in config.init_from_overrides "
    "(num_classes may always differ)"
)


def init_from_ref(config, meta: Mapping[str, Any]) -> checkpoint.CheckpointRef:
    """config.init_from's checkpoint, after checking its architecture (fields in init_from_overrides may differ)."""
    ref = checkpoint.resolve(config.init_from)
    allow = ("num_classes", *config.init_from_overrides)
    check_architecture(ref, meta, what="config.init_from", allow=allow, hint=INIT_FROM_HINT)
    return ref


def resume_ref(config, meta: Mapping[str, Any]) -> checkpoint.CheckpointRef:
    """config.resume's checkpoint, after checking its architecture (no difference allowed)."""
    ref = checkpoint.resolve(config.resume)
    check_architecture(ref, meta, what="config.resume", hint="or use config.init_from to fine-tune")
    return ref


def check_own_checkpoint(config, manager: ocp.CheckpointManager, meta: Mapping[str, Any]) -> None:
    """The workdir's checkpoints must be this config's model, and from this config.resume (if any).

    `meta` is the run's record (`Setup.meta`: model, model_kwargs and the config.resume it
    started from). Reads only the newest step whose meta can be read.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:  # restore_latest deals with unreadable ones
        ref = checkpoint.CheckpointRef("train", manager.directory / str(step), step)
        try:
            recorded = checkpoint.load_meta(ref)
        except checkpoint.CheckpointReadError:
            continue
        break
    else:
        return
    check_architecture(ref, meta, what="this workdir's checkpoint", hint="or use a fresh --workdir for another model")
    if config.resume and recorded.get("resume", "") != config.resume:
        raise checkpoint.CheckpointError(
            f"config.resume={config.resume!r} is set, but the workdir {manager.directory.parent} already has "
            f"its own checkpoints (steps {sorted(steps)}), not started from it; resuming would mix the two "
            "runs. Use a fresh --workdir to resume from config.resume, or unset config.resume to continue "
            "this workdir's run."
        )
