"""What both export formats share: the serving function, the spec JSON, checks and atomic writes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from biformer_jax import models, storage
from biformer_jax.storage import as_path
from biformer_jax.tasks.classification import inference

SPEC_FORMAT = "biformer_jax.export/1"
CHECK_BATCHES = (1, 3)
PREPROCESS_STEPS = (
    "convert the image to RGB",
    "resize (PIL, `interpolation`) so the shorter side is `resize` pixels (the longer one truncated)",
    "center-crop `image_size` x `image_size` (zero padding where smaller)",
    "scale the uint8 pixels to [0, 1]",
    "subtract `mean` and divide by `std`, per channel (RGB)",
    "stack as a float32 batch in NHWC layout",
)


class ExportError(RuntimeError):
    """An export that cannot be made or did not check out; nothing was written."""


def serving_fn(loaded: inference.Loaded) -> Callable[[jax.Array], jax.Array]:
    """images (N, S, S, 3) float32 NHWC, preprocessed -> logits (N, classes) float32; weights baked in."""
    variables = jax.tree.map(np.asarray, loaded.variables)
    model, task = loaded.model, loaded.task

    def logits(images):
        return task.predict_batch(model, variables, images)

    return logits


def check_inputs(loaded: inference.Loaded, seed: int = 0, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Normalised-range random images at each CHECK_BATCHES size (fixed seed), `size` (h, w)
    or the checkpoint's image size: the first N images of one batch of the largest size."""
    rng = np.random.default_rng(seed)
    s = loaded.preprocess.image_size
    h, w = size or (s, s)
    images = rng.standard_normal((max(CHECK_BATCHES), h, w, 3)).astype(np.float32)
    return [images[:n] for n in CHECK_BATCHES]


def reference_model(loaded: inference.Loaded):
    """The checkpoint's model as recorded (its own implementations; Pallas kernels -> 'auto' on CPU)."""
    kwargs = dict(loaded.meta.get("model_kwargs", {}))
    if str(kwargs.get("attn_impl", "")).startswith("pallas"):
        kwargs["attn_impl"] = "auto"
    return models.create_model(loaded.meta["model"], **kwargs)


def reference_outputs(loaded: inference.Loaded, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """`model.apply` of the checkpoint's model (reference_model), jitted, per input."""
    model = reference_model(loaded)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return [np.asarray(apply(loaded.variables, x)) for x in inputs]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| (Frobenius over the whole batch of logits)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ExportError(f"The exported model returned shape {got.shape}, model.apply {want.shape}.")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check(
    name: str,
    run: Callable[[np.ndarray], np.ndarray],
    loaded,
    tolerance: float,
    sizes: list[tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Runs the exported model at every CHECK_BATCHES size against model.apply; raises above tolerance.

    At the checkpoint's image size the errors are keyed `batch_N`; with `sizes` (h, w) (a
    symbolic-size artifact) at each of them, keyed `HxW_batch_N`.
    """
    errors = {}
    for size in sizes or [None]:
        inputs = check_inputs(loaded, size=size)
        prefix = f"{size[0]}x{size[1]}_" if size else ""
        # model.apply once per size, at the largest batch: every smaller batch is its first rows
        # (inference treats each image alone), which saves compiling the model per batch size.
        (want,) = reference_outputs(loaded, [max(inputs, key=len)])
        for x in inputs:
            errors[f"{prefix}batch_{len(x)}"] = relative_error(run(x), want[: len(x)])
    worst = max(errors.values())
    if not np.isfinite(worst) or worst > tolerance:
        raise ExportError(
            f"The {name} export does not reproduce model.apply: relative errors {errors} > {tolerance:g}. "
            "Nothing was written."
        )
    return errors


def spec_path(out: str) -> str:
    """The preprocessing spec beside the artifact: OUT + '.json' (model.onnx -> model.onnx.json)."""
    return out + ".json"


def check_writable(out: str, *, overwrite: bool) -> None:
    """Fails before any work when OUT or its spec exists (unless overwrite) or OUT is a directory."""
    if as_path(out).is_dir():
        raise ExportError(f"--out={out} is a directory; give the artifact's file name (e.g. {out}/model.stablehlo).")
    for path in (out, spec_path(out)):
        if as_path(path).exists() and not overwrite:
            raise ExportError(f"{path} already exists; pass --overwrite to replace it (nothing was written).")


def spec(
    loaded: inference.Loaded,
    *,
    kind: str,
    artifact: str,
    extra: Mapping[str, Any],
    input_shape: list | None = None,
) -> dict[str, Any]:
    """The spec JSON; `input_shape` (None for a symbolic dimension) defaults to (batch, S, S, 3)."""
    s = loaded.preprocess.image_size
    return {
        "format": SPEC_FORMAT,
        "kind": kind,
        "artifact": os.path.basename(artifact),
        "model": loaded.meta["model"],
        "model_kwargs": loaded.meta.get("model_kwargs", {}),
        "checkpoint": loaded.checkpoint,
        "step": loaded.meta.get("step"),
        "input": {"name": "images", "layout": "NHWC", "dtype": "float32", "shape": input_shape or [None, s, s, 3]},
        "output": {"name": "logits", "dtype": "float32", "shape": [None, loaded.num_classes]},
        "preprocess": {**loaded.preprocess.to_record(), "steps": list(PREPROCESS_STEPS)},
        "preprocess_source": loaded.preprocess_source,
        "class_names": list(loaded.class_names),
        **dict(extra),
    }


def write_atomically(files: Mapping[str, bytes], *, overwrite: bool) -> None:
    """Writes every {path: bytes} to a temporary sibling, then renames each into place.

    Local, gs:// or s3:// paths (etils.epath). Nothing is renamed until every file is complete,
    so a failure (or a kill) leaves at most hidden temporary files, never a half-written artifact.
    """
    for path in files:
        check_writable(path, overwrite=overwrite)
    tmps = {}
    try:
        for path, data in files.items():
            target = as_path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = storage.temporary_sibling(target)
            tmps[path] = tmp
            with tmp.open("wb") as f:
                f.write(data)
                if target.as_uri().startswith("file:"):  # local: on disk before the rename
                    f.flush()
                    os.fsync(f.fileno())
        for path, tmp in tmps.items():
            tmp.replace(as_path(path))
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                tmp.unlink()


def json_bytes(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()
