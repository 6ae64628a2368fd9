"""Official PyTorch state_dicts <-> Flax variables, for BiFormer and DeBiFormer.

Flax module names mirror the official module tree, so one rule maps every name: path
components are joined with '.', and a component ending in `_<digits>` becomes `.<digits>`
(`stages_2_5` -> `stages.2.5`). Leaves map by kind:

| Flax (collection / leaf)              | PyTorch                 | layout                         |
|---------------------------------------|-------------------------|--------------------------------|
| params .../kernel, 2-D                | ...weight (Linear)      | (in, out) <-> (out, in)        |
| params .../kernel, 4-D                | ...weight (Conv2d)      | (kh, kw, in, out) <-> (out, in, kh, kw) |
| params .../scale                      | ...weight (norms)       | as is                          |
| params .../bias, other params         | same name               | as is                          |
| batch_stats .../mean, .../var         | running_mean, running_var | as is                        |
| batch_stats .../num_batches_tracked   | num_batches_tracked     | int32 <-> int64                |
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from biformer_jax.models.from_config import CheckpointMismatchError, abstract_variables, dummy_input

_BN_STATS = {"mean": "running_mean", "var": "running_var", "num_batches_tracked": "num_batches_tracked"}


def _component(name: str) -> str:
    return re.sub(r"_(\d+)", r".\1", name)


def torch_key(collection: str, path: tuple[str, ...], ndim: int) -> str:
    """The official state_dict key of one Flax leaf."""
    *mods, leaf = path
    if collection == "batch_stats":
        leaf = _BN_STATS[leaf]
    elif leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join([_component(m) for m in mods] + [leaf])


def _to_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
    return value


def _from_torch_layout(path: tuple[str, ...], value: np.ndarray, ndim: int) -> np.ndarray:
    if path[-1] == "kernel":
        if ndim == 2 and value.ndim == 2:
            return value.T
        if ndim == 4 and value.ndim == 4:
            return value.transpose(2, 3, 1, 0)
    return value


def _strip_wrappers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    # DistributedDataParallel and torch.compile prefix every key.
    keys = list(state_dict)
    for prefix in ("module.", "_orig_mod."):
        if keys and all(k.startswith(prefix) for k in keys):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
            keys = list(state_dict)
    return dict(state_dict)


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def from_torch_state_dict(state_dict: Mapping[str, Any], model, *, strict: bool = True) -> dict[str, Any]:
    """{official key: array} -> {"params": ..., "batch_stats": ...} for `model`.

    Values may be numpy arrays or torch tensors. Keys prefixed by `module.` are accepted.
    Raises CheckpointMismatchError listing every missing, unexpected or mis-shaped key; with
    strict=False, unexpected keys (a classifier for a features_only backbone, say) are
    ignored, missing and mis-shaped ones still fail.
    """
    sd = _strip_wrappers(state_dict)
    abstract = abstract_variables(model)
    out: dict[str, Any] = {}
    missing, mismatched, used = [], [], set()
    for collection, tree in abstract.items():
        flat = traverse_util.flatten_dict(tree)
        converted = {}
        for path, spec in flat.items():
            key = torch_key(collection, path, len(spec.shape))
            if key not in sd:
                missing.append(f"{key} {tuple(spec.shape)}")
                continue
            used.add(key)
            value = _from_torch_layout(path, _as_numpy(sd[key]), len(spec.shape))
            if tuple(value.shape) != tuple(spec.shape):
                expected = _to_torch_layout(path, np.empty(spec.shape, np.int8)).shape
                mismatched.append(f"{key}: checkpoint {tuple(_as_numpy(sd[key]).shape)}, model {tuple(expected)}")
                continue
            if path[-1] == "num_batches_tracked":
                value = np.asarray(np.clip(value, 0, np.iinfo(np.int32).max), dtype=spec.dtype)
            else:
                value = np.asarray(value, dtype=spec.dtype)
            converted[path] = value
        out[collection] = traverse_util.unflatten_dict(converted)
    unexpected = [] if not strict else sorted(set(sd) - used)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            "The state_dict",
            _describe(model),
            missing,
            unexpected,
            mismatched,
            hint="Check that the model name and its arguments are the ones the checkpoint was trained "
            "with (for example biformer_small vs biformer_base, num_classes).",
        )
    return out


def to_torch_state_dict(variables: Mapping[str, Any]) -> OrderedDict[str, np.ndarray]:
    """The exact inverse of `from_torch_state_dict`: Flax variables -> {official key: numpy}.

    Works for any tree of the variables' structure (gradients, say); collections other than
    params and batch_stats are ignored.
    """
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for collection in ("params", "batch_stats"):
        if collection not in variables:
            continue
        for path, value in traverse_util.flatten_dict(variables[collection]).items():
            value = np.asarray(jax.device_get(value))
            key = torch_key(collection, path, value.ndim)
            if path[-1] == "num_batches_tracked":
                out[key] = value.astype(np.int64)
            else:
                out[key] = np.ascontiguousarray(_to_torch_layout(path, value))
    return out


def _describe(model) -> str:
    return f"{type(model).__name__}({', '.join(f'{k}={v!r}' for k, v in _model_fields(model).items())})"


def _model_fields(model) -> dict[str, Any]:
    keys = ("depth", "embed_dim", "qk_dims", "num_classes", "topks", "n_win")
    return {k: getattr(model, k) for k in keys if hasattr(model, k)}


__all__ = [
    "CheckpointMismatchError",
    "abstract_variables",
    "dummy_input",
    "from_torch_state_dict",
    "to_torch_state_dict",
    "torch_key",
]
