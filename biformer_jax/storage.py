"""Paths and whole-file writes that work alike on local disks, gs:// and s3:// (etils.epath).

Light on purpose (no Orbax, no TensorFlow at import): `plot`, the evaluators and the
predictors write their outputs through it, and `training.checkpoint` resolves paths with it.
"""

from __future__ import annotations

import os
import uuid

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: gs://, s3:// and other URLs kept as they are, local paths made absolute.

    Orbax wants absolute paths; `os.path.abspath` on a URL would turn `gs://b/x` into a local
    `<cwd>/gs:/b/x`.
    """
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def temporary_sibling(target: epath.Path) -> epath.Path:
    """A hidden, unique name beside `target` to write it under before renaming it into place."""
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


def write_atomically(path: str | os.PathLike, data: bytes) -> epath.Path:
    """Writes `data` to `path` whole or not at all: to a temporary sibling, then renamed over
    `path` (an existing file is replaced); the temporary file is removed if anything fails.
    The parent directory must exist (OSError otherwise). Returns the target path."""
    target = as_path(path)
    tmp = temporary_sibling(target)
    try:
        tmp.write_bytes(data)
        tmp.replace(target)  # epath's rename refuses an existing target
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return target
