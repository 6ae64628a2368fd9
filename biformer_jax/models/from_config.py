"""A model from a run's config, its variables' shapes, and the error for weights that do not fit it.

Used by the trainer (`training/`: train, eval, checkpoints) and the converter (`convert/`), so
neither depends on the other for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from biformer_jax.models import create_model

_LISTED = 50  # entries listed per kind of mismatch


class CheckpointMismatchError(ValueError):
    """Weights (a checkpoint, a state_dict) do not fit a model: lists every missing, unexpected and mis-shaped array.

    `missing`: in the model, not in the weights; `unexpected`: in the weights, not in the model;
    `mismatched`: in both with different shapes. `hint` ends the message with what to check.
    """

    def __init__(
        self, source: str, target: str, missing: Sequence, unexpected: Sequence, mismatched: Sequence, *, hint: str
    ):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"{source} does not match {target}:"]
        kinds = (("missing", self.missing), ("unexpected", self.unexpected), ("wrong shape", self.mismatched))
        for title, items in kinds:
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines.extend(f"    {item}" for item in items[:_LISTED])
                if len(items) > _LISTED:
                    lines.append(f"    ... and {len(items) - _LISTED} more")
        lines.append(hint)
        super().__init__("\n".join(lines))


def model_from_config(config, num_classes: int):
    """config.model with config.model_kwargs and the dataset's number of classes.

    `config.compute_dtype` ("float32" | "bfloat16") is the model's compute dtype (parameters,
    optimiser state and BatchNorm statistics stay float32, logits come back float32),
    `config.remat_stages` its `use_checkpoint_stages`, `config.scan_blocks` its `scan_blocks` and
    `config.bn_group_size` its `bn_group_size` (training BatchNorm statistics per group of that many
    images, the official per-GPU batch; 0: the whole batch). None changes the weights, so none is
    recorded in checkpoints (a run may resume across them).
    """
    kwargs = dict(config.model_kwargs)
    kwargs.setdefault("num_classes", num_classes)
    compute_dtype = config.compute_dtype
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.compute_dtype={compute_dtype!r}: use 'float32' or 'bfloat16'.")
    if compute_dtype != "float32":
        kwargs["dtype"] = jnp.dtype(compute_dtype)
    if config.remat_stages:
        kwargs["use_checkpoint_stages"] = tuple(int(i) for i in config.remat_stages)
    if config.bn_group_size:
        kwargs["bn_group_size"] = int(config.bn_group_size)
    if config.get("scan_blocks") is not None:  # segmentation configs leave it to their models
        kwargs["scan_blocks"] = bool(config.scan_blocks)
    return create_model(config.model, **kwargs)


def model_meta(config, num_classes: int) -> dict[str, Any]:
    """What a checkpoint records about its model (enough to rebuild it with create_model)."""
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config.model_kwargs).items()}
    kwargs.setdefault("num_classes", num_classes)
    return {"model": config.model, "model_kwargs": kwargs}


def dummy_input(model, image_size: int | Sequence[int] | None = None) -> jax.ShapeDtypeStruct:
    """A (1, H, W, C) input for shape inference: `image_size` is H = W or (H, W); without it, a
    square every registered model accepts."""
    side = image_size if image_size is not None else 32 * getattr(model, "n_win", 7)
    h, w = (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))
    return jax.ShapeDtypeStruct((1, h, w, getattr(model, "in_chans", 3)), jnp.float32)


def abstract_variables(model, image_size: int | Sequence[int] | None = None) -> dict[str, Any]:
    """{"params", "batch_stats"} of `model` as ShapeDtypeStructs (no compute), at `image_size` (H or (H, W))."""
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), dummy_input(model, image_size))
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
