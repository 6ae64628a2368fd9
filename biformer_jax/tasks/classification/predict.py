"""predict.py's work: find the images, classify them in fixed-size batches, format the top-k.

Images are read and preprocessed on the host (inference.preprocess: the checkpoint's eval
transform, so any size works), batched to `batch_size` (the last batch padded with zeros, so
the model compiles once) and classified by one jitted forward pass; probabilities are the
softmax of the logits in float32.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from biformer_jax.data.sources import IMAGE_EXTENSIONS
from biformer_jax.tasks.classification import inference

FORMATS = ("json", "csv")


def list_images(args: Sequence[str]) -> list[str]:
    """Files, folders (every image file below, sorted) and globs -> image paths, in argument order.

    A folder or glob that holds no image file, or a path that does not exist, is an error; a
    file named explicitly is taken whatever its extension (reading it tells whether it is an image).
    """
    if not args:
        raise inference.InferenceInputError("No images given: pass image files, folders or globs.")
    paths: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(arg)
                for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            what = f"folder {arg}"
        elif os.path.exists(arg):
            found, what = [arg], arg
        elif glob.has_magic(arg):
            found = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            what = f"glob {arg!r}"
        else:
            raise inference.InferenceInputError(f"{arg}: no such file or directory.")
        if not found:
            raise inference.InferenceInputError(
                f"The {what} matches no image file (extensions: {', '.join(IMAGE_EXTENSIONS)})."
            )
        paths.extend(found)
    return paths


@functools.partial(jax.jit, static_argnames=("model", "task", "top_k"))
def _top_k(variables, images, *, model, task, top_k: int):
    logits = task.predict_batch(model, variables, images)  # (N, classes) float32
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, top_k)  # (N, k) each


def predict(
    loaded: inference.Loaded, paths: Iterable[str], *, batch_size: int = 32, top_k: int = 5
) -> Iterator[dict[str, Any]]:
    """One record per path, in order: {"path", "labels", "probabilities", "classes"} or {"path", "error"}.

    An unreadable image yields its error record and the others go on.
    """
    if batch_size < 1:
        raise inference.InferenceInputError(f"--batch_size={batch_size}: must be at least 1.")
    if not 1 <= top_k:
        raise inference.InferenceInputError(f"--top_k={top_k}: must be at least 1.")
    k = min(top_k, loaded.num_classes)
    size = loaded.preprocess.image_size
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> Iterator[dict[str, Any]]:
        batch = np.zeros((batch_size, size, size, 3), np.float32)
        for i, (_, x) in enumerate(pending):
            batch[i] = x
        probs, idx = jax.device_get(_top_k(loaded.variables, batch, model=loaded.model, task=loaded.task, top_k=k))
        for i, (path, _) in enumerate(pending):
            classes = [int(c) for c in idx[i]]
            yield {
                "path": path,
                "labels": [loaded.class_names[c] for c in classes],
                "probabilities": [float(p) for p in probs[i]],
                "classes": classes,
            }
        pending.clear()

    for path in paths:
        try:
            x = inference.preprocess(inference.read_image(path), loaded.preprocess)
        except inference.InferenceInputError as e:
            yield from flush() if pending else ()
            yield {"path": path, "error": str(e)}
            continue
        pending.append((path, x))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


def format_json(record: dict[str, Any]) -> str:
    return json.dumps({k: record[k] for k in ("path", "labels", "probabilities", "classes")})


def csv_header(top_k: int) -> str:
    columns = ["path"] + [f"{name}_{i}" for i in range(1, top_k + 1) for name in ("label", "probability", "class")]
    return _csv_line(columns)


def format_csv(record: dict[str, Any]) -> str:
    row: list[Any] = [record["path"]]
    for label, prob, cls in zip(record["labels"], record["probabilities"], record["classes"]):
        row += [label, f"{prob:.6g}", cls]
    return _csv_line(row)


def _csv_line(row: Sequence[Any]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(row)
    return out.getvalue()
