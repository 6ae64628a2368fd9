"""StableHLO export: one `jax.export` artifact for cpu, cuda and tpu, batch (and size) symbolic.

The artifact is `Exported.serialize()` of the jitted forward pass with the weights baked in as
constants: (b, h, w, 3) float32 NHWC -> (b, classes) float32 logits. Loading needs only jax
(`jax.export.deserialize(data).call(images)`; biformer_jax/export/loader.py is such a loader).

- The batch `b` is always symbolic.
- Height and width are symbolic too (`h`, `w`) for models that pad their feature maps to the
  region grid: BiFormer with `auto_pad=True` (the segmentation setting) and every DeBiFormer
  (its attention always pads). Their padding is written as a ceiling division
  (`routing.region_grid`: region size `-(-h // n_win)`, padded to `n_win` times it), which
  shape polymorphism can express, and is always applied on a symbolic map. Each stage map is
  `ceil(side / 2**(i + 2))` (3x3/2 convs with padding 1), so any side >= 1 runs, except where
  a routed stage pools K/V by `kv_downsample_ratio` k > 1 (`maxpool` / `avgpool`): its regions
  must hold k x k tokens, i.e. side >= 2**(i + 2) * n_win * (k - 1) + 1 (`min_side`). That
  minimum is a constraint of the artifact (`h >= m`), checked when it is called, and is
  written in the spec JSON. The artifact's shape arithmetic (those divisions, re-evaluated for
  every symbolic-shaped op) is inlined and merged after export (`shape_arithmetic.compact`), so
  that a caller's first call at a new shape refines in well under a second.
- BiFormer without auto_pad keeps height and width fixed at the checkpoint's image size: its
  routing needs maps n_win divides and refuses others.
- Under symbolic sizes 'auto' routed attention runs 'gather' on every platform (no shape rule
  can weigh an unknown region size); the Pallas kernels need static grids and are refused
  (`attn_impl='pallas'` exports at a fixed size only: `symbolic_size=False`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from biformer_jax.export import common, shape_arithmetic
from biformer_jax.models import DeBiFormer
from biformer_jax.tasks.classification import inference

PLATFORMS = ("cpu", "cuda", "tpu")
TOLERANCE = 1e-6  # relative L2 error of the logits against model.apply, float32
POOLING_MODES = ("maxpool", "avgpool")  # kv_downsample modes whose window must fit in a region


def fixed_size_reason(model) -> Optional[str]:
    """None when `model` exports with symbolic height/width; otherwise why it cannot."""
    if str(getattr(model, "attn_impl", "")).startswith("pallas"):
        return (
            f"attn_impl={model.attn_impl!r} runs Pallas kernels, whose grids need static region sizes "
            "(export with --attn_impl=auto for symbolic sizes)"
        )
    if isinstance(model, DeBiFormer) or getattr(model, "auto_pad", False):
        return None
    return (
        "the model has auto_pad=False: its routing needs feature maps n_win divides, so height and width "
        "stay at the checkpoint's image size"
    )


def min_side(model) -> int:
    """The smallest height/width the model runs at (see the module docstring)."""
    side = 1
    for i in range(4):
        routed = isinstance(model, DeBiFormer) or model.topks[i] > 0
        k = model.kv_downsample_ratios[i]
        if routed and model.kv_downsample_mode in POOLING_MODES and k > 1:
            side = max(side, 2 ** (i + 2) * model.n_win * (k - 1) + 1)
    return side


def check_sizes(image_size: int, smallest: int) -> list[tuple[int, int]]:
    """(h, w) sizes a symbolic artifact is checked at: the image size and two odd-sized ones
    (224 -> 224x224, 200x296, 97x131), none below `smallest`."""
    s = image_size
    sizes = [(s, s), (s * 25 // 28, s * 37 // 28), ((s * 97 // 224) | 1, (s * 131 // 224) | 1)]
    return list(dict.fromkeys((max(h, smallest), max(w, smallest)) for h, w in sizes))


def export(
    loaded: inference.Loaded, platforms: Sequence[str] = PLATFORMS, *, symbolic_size: bool = False
) -> jax_export.Exported:
    """The jax.export of `loaded`'s forward pass for `platforms`: batch symbolic, and height/width
    too with `symbolic_size` (ExportError where the model cannot: `fixed_size_reason`)."""
    if symbolic_size:
        reason = fixed_size_reason(loaded.model)
        if reason:
            raise common.ExportError(f"Height and width cannot be symbolic: {reason}. Nothing was written.")
        m = min_side(loaded.model)
        constraints = (f"h >= {m}", f"w >= {m}") if m > 1 else ()
        batch, h, w = jax_export.symbolic_shape("b, h, w", constraints=constraints)
    else:
        (batch,) = jax_export.symbolic_shape("b")
        h = w = loaded.preprocess.image_size
    spec = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32)
    try:
        exported = jax_export.export(jax.jit(common.serving_fn(loaded)), platforms=tuple(platforms))(spec)
    except Exception as e:  # lowering errors name the op and platform; keep them, add the context
        raise common.ExportError(f"jax.export for {list(platforms)} failed: {type(e).__name__}: {e}") from e
    # Symbolic h, w: the stage sizes' divisions, merged, so that each new call shape refines in
    # well under a second instead of ~15 s (shape_arithmetic).
    return shape_arithmetic.compact(exported) if symbolic_size else exported


def run_serialized(data: bytes, images: np.ndarray) -> np.ndarray:
    """Deserialises an artifact and runs it on the default device (what the standalone loader does)."""
    return np.asarray(jax_export.deserialize(bytearray(data)).call(images))


def _size_record(loaded: inference.Loaded, symbolic: bool) -> dict[str, Any]:
    s = loaded.preprocess.image_size
    if not symbolic:
        return {
            "input_shape": [None, s, s, 3],
            "symbolic_dims": {"b": "batch size (any >= 1)"},
            "fixed_size": f"height and width are fixed at {s}: {fixed_size_reason(loaded.model)}",
        }
    m = min_side(loaded.model)
    return {
        "input_shape": [None, None, None, 3],
        "symbolic_dims": {
            "b": "batch size (any >= 1)",
            "h": f"image height (any >= {m})",
            "w": f"image width (any >= {m})",
        },
        "min_size": [m, m],
        "size_note": (
            "any height/width >= min_size runs; the model was evaluated at the preprocessing's "
            "image_size (resize + center crop), which other sizes skip at the user's choice"
        ),
    }


def export_checkpoint(
    loaded: inference.Loaded, out: str, *, overwrite: bool = False, symbolic_size: Optional[bool] = None
) -> dict[str, Any]:
    """Writes OUT (the serialized artifact) and its spec JSON; returns the spec (with the check's errors).

    `symbolic_size`: None (default) makes height/width symbolic where the model allows it
    (`fixed_size_reason` is None), True requires it, False keeps them at the image size.
    """
    common.check_writable(out, overwrite=overwrite)
    if symbolic_size is None:
        symbolic_size = fixed_size_reason(loaded.model) is None
    exported = export(loaded, symbolic_size=symbolic_size)
    data = bytes(exported.serialize())
    sizes = check_sizes(loaded.preprocess.image_size, min_side(loaded.model)) if symbolic_size else None
    errors = common.check("stablehlo", lambda x: run_serialized(data, x), loaded, TOLERANCE, sizes=sizes)
    size = _size_record(loaded, symbolic_size)
    record = common.spec(
        loaded,
        kind="stablehlo",
        artifact=out,
        input_shape=size.pop("input_shape"),
        extra={
            "platforms": list(exported.platforms),
            **size,
            "implementations": {k: getattr(loaded.model, k) for k in inference.IMPL_OPTIONS},
            "check": {"relative_error": errors, "tolerance": TOLERANCE, "against": "jit(model.apply), CPU"},
            "loader": "python -m biformer_jax.export.loader (a standalone file: needs only jax, numpy, PIL)",
        },
    )
    common.write_atomically({common.spec_path(out): common.json_bytes(record), out: data}, overwrite=overwrite)
    return record
