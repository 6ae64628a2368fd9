"""Reading official `.pth` files and writing converted variables (complete or not at all)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

META_FILE = "biformer_jax.json"
VARIABLES_DIR = "variables"


class ConversionError(RuntimeError):
    """A file that cannot be converted; the message says why and what to do."""


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ConversionError(
            "Reading a .pth file needs PyTorch: `pip install torch` (the CPU build is enough), "
            "or `pip install biformer-jax[torch]`."
        ) from e
    return torch


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(hasattr(v, "shape") for v in obj.values())


def read_torch_checkpoint(path: str | os.PathLike, weights: str = "auto") -> tuple[dict[str, np.ndarray], str]:
    """Loads a raw state_dict or a training checkpoint; returns (state_dict, entry).

    Official BiFormer training saves {"model": ..., "optimizer": ..., "model_ema": ..., ...} and
    mmsegmentation {"state_dict": ..., "meta": ..., "optimizer": ...}; `weights` chooses the
    entry ("auto": "model" if present, else "state_dict"). Tensors come back as numpy arrays.
    """
    sd, entry, _ = read_torch_checkpoint_with_meta(path, weights)
    return sd, entry


def read_torch_checkpoint_with_meta(
    path: str | os.PathLike, weights: str = "auto"
) -> tuple[dict[str, np.ndarray], str, dict[str, Any]]:
    """`read_torch_checkpoint` plus what the file says about itself that is worth keeping:
    {"classes": [...]} from an mmseg checkpoint's `meta["CLASSES"]`, when present."""
    path = epath.Path(path)  # gs://, s3:// or local
    if not path.is_file():
        raise ConversionError(f"{path} does not exist or is not a file.")
    torch = _import_torch()
    try:
        with path.open("rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {e}).") from e
    if _is_state_dict(obj):
        entry, sd = "state_dict", obj
    elif isinstance(obj, Mapping):
        if weights == "auto":
            weights = "model" if "model" in obj else "state_dict"
        if weights not in obj or not _is_state_dict(obj[weights]):
            found = [k for k, v in obj.items() if _is_state_dict(v)]
            raise ConversionError(
                f"{path} has no state_dict under {weights!r}; entries holding weights: {found or 'none'}. "
                f"Pass --weights={found[0]}."
                if found
                else f"{path} holds no state_dict."
            )
        entry, sd = weights, obj[weights]
    else:
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state_dict.")
    extra: dict[str, Any] = {}
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping) and isinstance(meta.get("CLASSES"), (list, tuple)):
        extra["classes"] = [str(c) for c in meta["CLASSES"]]
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}, entry, extra


def save_converted(out_dir: str | os.PathLike, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Writes `variables` (Orbax) and `meta` (JSON) to out_dir, atomically: complete or absent.

    jax Arrays are written from host copies (`jax.device_get`): Orbax slices a device array per
    replica with one compiled program per array shape (a detector's ~330 arrays: ~17 s at the
    tests' XLA level), a host array it writes as is."""
    import jax
    import orbax.checkpoint as ocp

    text = os.fspath(out_dir)
    out = epath.Path(text if "://" in text else os.path.abspath(text))  # Orbax wants absolute paths
    if out.exists():
        raise ConversionError(f"{out} already exists; choose a new --output (nothing is overwritten).")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / VARIABLES_DIR, jax.device_get(dict(variables)))
            ckptr.wait_until_finished()
        (tmp / META_FILE).write_text(json.dumps(dict(meta), indent=2) + "\n")
        tmp.rename(out)
    finally:
        if tmp.exists():
            tmp.rmtree()


def load_converted(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a directory written by `save_converted`: (variables as numpy, meta)."""
    import orbax.checkpoint as ocp

    text = os.fspath(path)
    path = epath.Path(text if "://" in text else os.path.abspath(text))
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise ConversionError(f"{path} is not a converted checkpoint (no {META_FILE}).")
    meta = json.loads(meta_file.read_text())
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(path / VARIABLES_DIR)
    return variables, meta
