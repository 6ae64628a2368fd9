"""The one way a trained model comes out of a checkpoint: `load(checkpoint, ...)` -> model, variables, record.

    loaded = loader.load("workdirs/run", expect=model_meta(config, num_classes), what="--checkpoint")
    out = loaded.model.apply(loaded.variables, x, train=False)

eval.py (every task), predict.py, segmentation predict, export and visualize load through it;
resume and init_from check the same record with the same function (`restore.check_architecture`)
before they read a single array. A checkpoint records its model (`model`, `model_kwargs`); given
`expect` (the config's record), a checkpoint of another architecture (another model name, or
the same shapes with other `topks`, `n_win`, `auto_pad`, head settings, ...) is refused with
the list of differences, whatever the task. Without `expect` the recorded model is rebuilt as
it is (`overrides` may change how, not what, it computes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from biformer_jax import models
from biformer_jax.models import from_config
from biformer_jax.training import checkpoint, restore


class RecordError(checkpoint.CheckpointError):
    """A checkpoint whose record names no model, or one this package cannot build."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A checkpoint's model and weights. `variables`: {"params", "batch_stats"}; `ema_variables`
    likewise, or None (not asked for, or a checkpoint without EMA); `record`: its meta."""

    model: Any
    variables: dict[str, Any]
    ema_variables: dict[str, Any] | None
    record: dict[str, Any]
    ref: checkpoint.CheckpointRef


def load(
    path: str | os.PathLike | checkpoint.CheckpointRef,
    *,
    input_size: int | Sequence[int],
    expect: Mapping[str, Any] | None = None,
    what: str = "--checkpoint",
    model: Any = None,
    overrides: Mapping[str, Any] | None = None,
    ema: str = "no",
    shardings: Any = None,
    on_host: bool = False,
) -> Loaded:
    """The model `path` records (or `model`), with its weights; refuses another architecture.

    `expect`: the caller's {"model", "model_kwargs"} record: any architecture difference raises
    `restore.ArchitectureMismatchError` listing them (what = the flag or field that named the
    checkpoint). `model`: the module to load into (built from the caller's config, e.g. with its
    compute dtype); default: the recorded model with `overrides`. `input_size`: the side (or
    (H, W)) the abstract variables are traced at. `ema`: "no" (raw weights), "only" (the EMA
    weights as `variables`; an error when absent), "also" (raw, and EMA in `ema_variables` when
    the checkpoint has them). `shardings`: placed accordingly when given (default: one device);
    `on_host`: host numpy arrays instead. Arrays that do not fit raise `CheckpointMismatchError`
    listing them.
    """
    if ema not in ("no", "only", "also"):
        raise ValueError(f"ema={ema!r}: use 'no', 'only' or 'also'.")
    ref = path if isinstance(path, checkpoint.CheckpointRef) else checkpoint.resolve(path)
    record = checkpoint.load_meta(ref)
    if expect is not None:
        restore.check_architecture(ref, expect, what=what)
    if model is None:
        model = build(ref, record, overrides)
    abstract = from_config.abstract_variables(model, input_size)
    if shardings is not None:
        from biformer_jax.training import sharding  # noqa: PLC0415  (only callers that shard pay for it)

        abstract = sharding.with_shardings(abstract, shardings)

    def read(use_ema: bool) -> dict[str, Any]:
        if on_host:  # checked against the model first, then read as numpy
            item = "ema_variables" if use_ema else "variables"
            checkpoint.check_compatible(ref, abstract, what="the model its record names", item=item)
            return checkpoint.load_variables(ref, ema=use_ema)
        return checkpoint.load_variables(ref, ema=use_ema, abstract=abstract)

    ema_variables = None
    variables = read(ema == "only")
    if ema == "also" and ref.kind == "train" and checkpoint.has_item(ref, "ema_variables"):
        ema_variables = read(True)
    ema_variables = None if ema_variables is None else _plain(ema_variables)
    return Loaded(model, _plain(variables), ema_variables, dict(record), ref)


def build(ref: checkpoint.CheckpointRef, record: Mapping[str, Any], overrides: Mapping[str, Any] | None = None):
    """create_model(record's model, **record's model_kwargs, **overrides); RecordError when it cannot be built."""
    name = record.get("model")
    if not name:
        raise RecordError(
            f"The checkpoint {ref.path} has no model record (its meta names no 'model'): add "
            f'"model": <create_model name> and "model_kwargs" to it, as `python -m biformer_jax.convert` writes.'
        )
    if name not in models.list_models():
        raise RecordError(f"{ref.path} records model {name!r}, which this project does not define.")
    try:
        return models.create_model(name, **{**dict(record.get("model_kwargs", {})), **dict(overrides or {})})
    except (TypeError, ValueError) as e:
        raise RecordError(f"The checkpoint {ref.path} names a model this package cannot build: {e}") from None


def _plain(variables: Mapping[str, Any]) -> dict[str, Any]:
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
