"""Orbax checkpoints: train.py's (resumable) and the converter's (variables only).

Two formats, one loader:

* **variables checkpoint** (written by `python -m biformer_jax.convert` through
  `convert.files.save_converted`): a directory `DIR/variables/` (an Orbax StandardCheckpointer
  save of {"params", "batch_stats"}) and `DIR/biformer_jax.json` = {"format":
  "biformer_jax.variables/1", "model": <create_model name>, "model_kwargs": {...}, ...}.
* **train checkpoint**: `WORKDIR/checkpoints/<step>/` written by an Orbax CheckpointManager
  (asynchronously, atomically: a step directory appears only once complete) with items
  `variables` (same layout as above), `ema_variables` (when EMA is on), `train` ({"step",
  "opt_state", "rng"}) and `meta` (JSON: format "biformer_jax.train/1", model, model_kwargs, step).

`resolve` accepts either directory, a train step directory, a CheckpointManager directory or a
train.py workdir (meaning its latest checkpoint). Restoring checks shapes first and raises
`CheckpointMismatchError` listing every missing, unexpected and mis-shaped array;
`init_variables_from` puts a checkpoint's weights into a fresh state (config.init_from),
re-initialising a classifier of another size.

Every problem with a checkpoint the user named (none there, a PyTorch file, an item missing, a
file Orbax cannot read, another model) raises a `CheckpointError`: one message saying what is
wrong and what to do, which the entry points print without a traceback. Paths go through
`etils.epath`, so gs://, s3:// and local directories all work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from biformer_jax.models import block_layout
from biformer_jax.models.from_config import CheckpointMismatchError
from biformer_jax.storage import as_path  # noqa: F401  (checkpoint.as_path: its callers' name for it)
from biformer_jax.training.checkpoint_manager import CHECKPOINT_SUBDIR
from biformer_jax.training.train_state import TrainState

VARIABLES_FORMAT = "biformer_jax.variables/1"
TRAIN_FORMAT = "biformer_jax.train/1"
META_FILE = "biformer_jax.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked; the message says why and what to do."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was named (a typo, a PyTorch file, a directory of something else)."""


class CheckpointReadError(CheckpointError):
    """A checkpoint exists but cannot be read (a truncated or partly deleted directory)."""


MISMATCH_HINT = (
    "Check config.model / config.model_kwargs against the model the checkpoint was made "
    "with (its biformer_jax.json or meta says which), or use a fresh --workdir."
)


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A resolved checkpoint: `path` holds `variables/` (and `ema_variables/`, `train/`, `meta/`)."""

    kind: str  # "variables" (converter format) | "train" (a train.py step)
    path: epath.Path
    step: int | None = None

    def __str__(self) -> str:
        return os.fspath(self.path)


# ---------------------------------------------------------------------------------------
# Finding and reading checkpoints


def _latest_step_dir(manager_dir: epath.Path) -> epath.Path | None:
    steps = ocp.utils.checkpoint_steps(manager_dir) if manager_dir.is_dir() else []
    return manager_dir / str(max(steps)) if steps else None


def resolve(path: str | os.PathLike) -> CheckpointRef:
    """Which checkpoint `path` means; raises CheckpointNotFoundError saying what was expected."""
    p = as_path(path)
    if p.is_file():
        hint = (
            f" A PyTorch checkpoint must be converted first: python -m biformer_jax.convert --input={p} "
            "--model=<name> --output=DIR, then use DIR."
            if p.suffix in (".pth", ".pt", ".bin", ".tar")
            else ""
        )
        raise CheckpointNotFoundError(f"{p} is a file, not a checkpoint directory.{hint}")
    if (p / META_FILE).exists():
        return CheckpointRef("variables", p)
    if (p / "variables").is_dir() and (p / "meta").is_dir():
        return CheckpointRef("train", p, int(p.name) if p.name.isdigit() else None)
    for manager_dir in (p / CHECKPOINT_SUBDIR, p):
        step_dir = _latest_step_dir(manager_dir)
        if step_dir is not None:
            return CheckpointRef("train", step_dir, int(step_dir.name))
    missing = "" if p.exists() else " (no such directory)"
    raise CheckpointNotFoundError(
        f"No checkpoint at {p}{missing}. Expected a converter checkpoint (DIR/{META_FILE} + DIR/variables/), "
        f"a train.py workdir (WORKDIR/{CHECKPOINT_SUBDIR}/<step>/), or one of its step directories."
    )


@contextlib.contextmanager
def _reading(path: epath.Path):
    """Turns any failure to read `path` (Orbax, tensorstore, JSON, a missing file) into a CheckpointReadError."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (what Orbax raises for a damaged file varies by backend)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointReadError(
            f"Cannot read the checkpoint {path}: {type(e).__name__}: {first[:300]}. The directory is damaged "
            "or incomplete; use another checkpoint (the previous step of its workdir) or re-create it."
        ) from e


def _read_train_meta(step_dir: epath.Path) -> dict[str, Any]:
    with _reading(step_dir / "meta"):
        return json.loads((step_dir / "meta" / "metadata").read_text())


def load_meta(path: str | os.PathLike | CheckpointRef) -> dict[str, Any]:
    """The checkpoint's description: format, model, model_kwargs (and step for train ones)."""
    ref = path if isinstance(path, CheckpointRef) else resolve(path)
    if ref.kind == "variables":
        with _reading(ref.path / META_FILE):
            meta = json.loads((ref.path / META_FILE).read_text())
        expected = VARIABLES_FORMAT
    else:
        meta = _read_train_meta(ref.path)
        expected = TRAIN_FORMAT
    if meta.get("format") != expected:
        raise CheckpointError(f"{ref.path}: checkpoint format {meta.get('format')!r}, expected {expected!r}.")
    return meta


def saved_shapes(ref: CheckpointRef, item: str = "variables") -> dict[str, Any]:
    """The saved arrays of one item as ShapeDtypeStructs (no data read)."""
    item_dir = ref.path / item
    if not item_dir.is_dir():
        raise CheckpointNotFoundError(f"{ref.path} has no {item!r} item: it is not a complete checkpoint.")
    with _reading(item_dir):
        tree = ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def has_item(ref: CheckpointRef, item: str) -> bool:
    return (ref.path / item).is_dir()


def _key_name(key) -> str:
    # Orbax reads namedtuples (optax states) back as dicts: compare by field name either way.
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def mismatches(saved: Any, expected: Any, *, ignore: Sequence[str] = ()) -> tuple[list, list, list]:
    """(missing, unexpected, mis-shaped) leaf paths between two trees of shaped leaves."""

    def flat(tree):
        out = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = [_key_name(k) for k in path]
            if not any(name in ignore for name in names):
                out["/".join(names)] = tuple(leaf.shape)
        return out

    s, e = flat(saved), flat(expected)
    missing = [f"{k} {e[k]}" for k in sorted(set(e) - set(s))]
    unexpected = [f"{k} {s[k]}" for k in sorted(set(s) - set(e))]
    mismatched = [f"{k}: checkpoint {s[k]}, model {e[k]}" for k in sorted(set(s) & set(e)) if s[k] != e[k]]
    return missing, unexpected, mismatched


def check_compatible(ref: CheckpointRef, expected: Any, *, what: str, item: str = "variables", ignore=()) -> None:
    """Raises CheckpointMismatchError unless the item's arrays have the model's names and shapes."""
    missing, unexpected, mismatched = mismatches(saved_shapes(ref, item), expected, ignore=ignore)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"The checkpoint {ref.path / item}", what, missing, unexpected, mismatched, hint=MISMATCH_HINT
        )


def load_variables(
    path: str | os.PathLike | CheckpointRef, *, ema: bool = False, abstract: Any | None = None
) -> dict[str, Any]:
    """{"params", "batch_stats"} of any checkpoint (`ema=True`: the EMA weights of a train one).

    Without `abstract` the arrays come back as host numpy arrays; with it (ShapeDtypeStructs,
    optionally carrying shardings) they are restored as jax Arrays placed accordingly, after a
    shape check that lists every mismatch.
    """
    ref = path if isinstance(path, CheckpointRef) else resolve(path)
    item = "ema_variables" if ema else "variables"
    item_dir = ref.path / item
    if not item_dir.is_dir():
        raise CheckpointNotFoundError(
            f"{ref.path} has no {item!r} (EMA weights are only in train checkpoints with EMA)."
        )
    checkpointer = ocp.StandardCheckpointer()
    if abstract is not None:
        check_compatible(ref, abstract, what="the model", item=item)
    with _reading(item_dir):
        return checkpointer.restore(item_dir) if abstract is None else checkpointer.restore(item_dir, abstract)


def init_variables_from(path: str | os.PathLike, state: TrainState, shardings: TrainState) -> TrainState:
    """A fresh state whose weights (and EMA) are those of the checkpoint at `path` (config.init_from).

    Any checkpoint `resolve` accepts. Every array but the classifier must match the model; a
    classifier of another size (or none) is kept as initialised, with a warning, and a
    checkpoint's classifier is dropped for a model without one. The arrays are placed by
    `shardings`.
    """
    ref = resolve(path)
    saved = saved_shapes(ref)
    head_ok = True
    missing, unexpected, mismatched = mismatches(saved, per_block(state.variables), ignore=("head",))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"The checkpoint {ref.path} (config.init_from)",
            "the configured model",
            missing,
            unexpected,
            mismatched,
            hint=MISMATCH_HINT,
        )
    model_head = state.params.get("head")
    saved_head = saved["params"].get("head")
    if model_head is not None:
        head_ok = saved_head is not None and all(
            tuple(saved_head[k].shape) == tuple(model_head[k].shape) for k in model_head if k in saved_head
        )
    loaded = load_variables(ref)  # host numpy
    if not head_ok:
        old = saved_head["kernel"].shape[-1] if saved_head and "kernel" in saved_head else "no"
        logging.warning(
            "init_from %s: the checkpoint's classifier has %s classes, the model %d: the head is re-initialised.",
            ref.path,
            old,
            model_head["kernel"].shape[-1],
        )
        loaded["params"]["head"] = jax.device_get(state.params["head"])
    elif model_head is None:
        loaded["params"].pop("head", None)

    state = with_variables(state, {"params": loaded["params"], "batch_stats": loaded.get("batch_stats", {})}, shardings)
    logging.info("Initialised the weights from %s (%s checkpoint).", ref.path, ref.kind)
    return state


def with_variables(state: TrainState, variables: Mapping[str, Any], shardings: TrainState) -> TrainState:
    """`state` with host `variables` ({"params", "batch_stats"}, the state's tree) as its weights and EMA.

    The arrays are cast to the state's dtypes and placed by `shardings` (what init_from does once
    it has the weights it will start from, for every task). Per-block `variables` are stacked
    first when the state keeps stacked stages (`models.block_layout`).
    """
    if block_layout.is_stacked(state.params):
        variables = block_layout.stack(jax.tree.map(np.asarray, dict(variables)))

    def place(value, like, leaf_sharding):
        value = np.asarray(value, dtype=like.dtype)
        return jax.make_array_from_callback(value.shape, leaf_sharding, lambda index: value[index])

    placed = jax.tree.map(place, dict(variables), state.variables, shardings.variables)
    state = state.replace(params=placed["params"], batch_stats=placed["batch_stats"])
    if state.has_ema:
        ema = jax.tree.map(lambda x: x.copy(), placed)
        state = state.replace(ema_params=ema["params"], ema_batch_stats=ema["batch_stats"])
    return state


# ---------------------------------------------------------------------------------------
# A train state in train.py's checkpoints (the manager: training/checkpoint_manager.py)


def _train_item(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def per_block(tree: Any) -> Any:
    """`tree` (variables, a state) in the per-block layout of checkpoints: stacked stages
    (`models.block_layout`) unstacked as shapes (ShapeDtypeStructs with their shardings)."""
    return block_layout.unstack(tree, take=block_layout.abstract_take)


def host_variables(state: TrainState) -> dict[str, Any]:
    """The state's {"params", "batch_stats"} as host numpy arrays in the per-block layout (what a
    task's init_from merges a checkpoint into)."""
    return block_layout.unstack(jax.device_get(state.variables))


@jax.jit
def _unstack(state: TrainState) -> TrainState:
    # One program slices every stacked leaf (compiled at the first save). The block axis is never
    # sharded, so XLA's sharding propagation leaves each slice sharded as its leaf was.
    return block_layout.unstack(state)


def save_train_state(
    manager: ocp.CheckpointManager,
    state: TrainState,
    *,
    step: int,
    meta: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> None:
    """Starts an asynchronous save of `state` as checkpoint `step`, always in the per-block layout.

    A state that keeps stacked stages (`models.block_layout`) is unstacked first into new arrays
    (device memory for one more copy of the state while the save copies it to the host)."""
    if block_layout.is_stacked(state.params):
        state = _unstack(state)
    items = {
        "variables": ocp.args.PyTreeSave(state.variables),
        "train": ocp.args.PyTreeSave(_train_item(state)),
        "meta": ocp.args.JsonSave({"format": TRAIN_FORMAT, **dict(meta), "step": int(step)}),
    }
    if state.has_ema:
        items["ema_variables"] = ocp.args.PyTreeSave(state.ema_variables)
    manager.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None, force=True)


def restore_train_state(ref: CheckpointRef, abstract_state: TrainState) -> TrainState:
    """The full train state of a train checkpoint, placed by the shardings in `abstract_state`.

    Every item is shape-checked first, so another model's checkpoint fails with the list of
    differences instead of an Orbax error. Checkpoints hold the per-block layout: a state with
    stacked stages (`models.block_layout`) is read per block and stacked into its shardings.
    """
    if not block_layout.is_stacked(abstract_state.params):
        return _restore_train_state(ref, abstract_state)
    state = _restore_train_state(ref, per_block(abstract_state))
    shardings = [getattr(a, "sharding", None) for a in jax.tree.leaves(abstract_state)]
    if any(s is None for s in shardings):
        return jax.jit(block_layout.stack)(state)
    return jax.jit(block_layout.stack, out_shardings=jax.tree.unflatten(jax.tree.structure(abstract_state), shardings))(
        state
    )


def _restore_train_state(ref: CheckpointRef, abstract_state: TrainState) -> TrainState:
    if ref.kind != "train":
        raise CheckpointError(
            f"{ref.path} holds model variables only (no optimiser state): use config.init_from "
            "to start from it, not a resume."
        )
    if not has_item(ref, "train"):
        raise CheckpointNotFoundError(
            f"{ref.path} has no 'train' item (optimiser state): it cannot be resumed. Use config.init_from "
            "to start from its weights."
        )
    check_compatible(ref, abstract_state.variables, what="the configured model", item="variables")
    check_compatible(ref, _train_item(abstract_state), what="the configured optimiser state", item="train")
    checkpointer = ocp.StandardCheckpointer()
    with _reading(ref.path / "variables"):
        variables = checkpointer.restore(ref.path / "variables", abstract_state.variables)
    with _reading(ref.path / "train"):
        train = checkpointer.restore(ref.path / "train", _train_item(abstract_state))
    state = abstract_state.replace(
        step=train["step"],
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=train["opt_state"],
        rng=train["rng"],
    )
    if abstract_state.has_ema:
        if has_item(ref, "ema_variables"):
            with _reading(ref.path / "ema_variables"):
                ema = checkpointer.restore(ref.path / "ema_variables", abstract_state.ema_variables)
        else:  # EMA switched on after the checkpoint: start it from the weights
            ema = jax.tree.map(lambda x: x.copy(), variables)
        state = state.replace(ema_params=ema["params"], ema_batch_stats=ema["batch_stats"])
    return state
