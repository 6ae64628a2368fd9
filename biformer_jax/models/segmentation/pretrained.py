"""Initialising a segmentation model's backbone from an ImageNet classifier's variables.

The official configs start from the classifier checkpoint (`load_checkpoint(..., strict=False)`
in `BiFormer_mm.init_weights`): every array the backbone shares with the classifier by name
and shape is loaded; the classifier's `norm` and `head` have no place, and the backbone's
`extra_norms` and the heads keep their fresh initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import traverse_util


def init_backbone_from_classifier(
    variables: Mapping[str, Any], classifier_variables: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str], list[str]]:
    """(variables with the backbone loaded, loaded paths, fresh paths).

    `variables`: a segmentation model's {"params", "batch_stats"} (its backbone under
    "backbone"); `classifier_variables`: a BiFormer / DeBiFormer classifier's (ours, or
    converted from an official checkpoint). Raises ValueError when an array the two share
    by name has another shape (another variant, say), and when nothing at all is shared.
    Paths are '/'-joined, e.g. "params/backbone/stages_0_0/attn/qkv/kernel".
    """
    out: dict[str, Any] = {}
    loaded, fresh, mismatched = [], [], []
    for collection, tree in variables.items():
        source = traverse_util.flatten_dict(dict(classifier_variables.get(collection, {})))
        flat = traverse_util.flatten_dict(dict(tree))
        for path, value in flat.items():
            name = "/".join((collection, *path))
            inner = path[1:] if path[0] == "backbone" else None
            if inner is None or inner not in source:
                fresh.append(name)
                continue
            if source[inner].shape != value.shape:
                mismatched.append(f"{name}: classifier {tuple(source[inner].shape)}, model {tuple(value.shape)}")
                continue
            flat[path] = jax.numpy.asarray(source[inner], dtype=value.dtype)
            loaded.append(name)
        out[collection] = traverse_util.unflatten_dict(flat)
    if mismatched:
        raise ValueError(
            "The classifier's arrays do not fit this backbone (a different variant?):\n  "
            + "\n  ".join(mismatched[:20])
        )
    if not loaded:
        raise ValueError("The classifier shares no array with this backbone: is it a BiFormer / DeBiFormer classifier?")
    return out, loaded, fresh
