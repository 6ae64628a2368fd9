"""StableHLO export: one `jax.export` artifact for cpu, cuda and tpu with a symbolic batch size.

The artifact is `Exported.serialize()` of the jitted forward pass with the weights baked in as
constants: (b, S, S, 3) float32 NHWC -> (b, classes) float32 logits, `b` symbolic. Loading needs
only jax (`jax.export.deserialize(data).call(images)`; biformer_jax/export/loader.py is such a
loader). Height and width are fixed at the checkpoint's image size: with `auto_pad` the routing
pads each stage map to `h + (-h) % n_win`, a size JAX's shape polymorphism cannot prove equal to
the `n_win * ceil(h / n_win)` that its region reshape yields, so symbolic height and width do not
trace (InconclusiveDimensionOperation / incompatible shapes) and are not offered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from biformer_jax import inference
from biformer_jax.export import common

PLATFORMS = ("cpu", "cuda", "tpu")
TOLERANCE = 1e-6  # relative L2 error of the logits against model.apply, float32


def export(loaded: inference.Loaded, platforms: Sequence[str] = PLATFORMS) -> jax_export.Exported:
    """The jax.export of `loaded`'s forward pass for `platforms`, batch size symbolic."""
    (batch,) = jax_export.symbolic_shape("b")
    s = loaded.preprocess.image_size
    spec = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
    try:
        return jax_export.export(jax.jit(common.serving_fn(loaded)), platforms=tuple(platforms))(spec)
    except Exception as e:  # lowering errors name the op and platform; keep them, add the context
        raise common.ExportError(f"jax.export for {list(platforms)} failed: {type(e).__name__}: {e}") from e


def run_serialized(data: bytes, images: np.ndarray) -> np.ndarray:
    """Deserialises an artifact and runs it on the default device (what the standalone loader does)."""
    return np.asarray(jax_export.deserialize(bytearray(data)).call(images))


def export_checkpoint(loaded: inference.Loaded, out: str, *, overwrite: bool = False) -> dict[str, Any]:
    """Writes OUT (the serialized artifact) and its spec JSON; returns the spec (with the check's errors)."""
    common.check_writable(out, overwrite=overwrite)
    exported = export(loaded)
    data = bytes(exported.serialize())
    errors = common.check("stablehlo", lambda x: run_serialized(data, x), loaded, TOLERANCE)
    record = common.spec(
        loaded,
        kind="stablehlo",
        artifact=out,
        extra={
            "platforms": list(exported.platforms),
            "symbolic_dims": {"b": "batch size (any >= 1)"},
            "implementations": {k: getattr(loaded.model, k) for k in inference.IMPL_OPTIONS},
            "check": {"relative_error": errors, "tolerance": TOLERANCE, "against": "jit(model.apply), CPU"},
            "loader": "python -m biformer_jax.export.loader (a standalone file: needs only jax, numpy, PIL)",
        },
    )
    common.write_atomically({common.spec_path(out): common.json_bytes(record), out: data}, overwrite=overwrite)
    return record
