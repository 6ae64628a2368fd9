"""Starting a segmentation model from other weights (`config.init_from`).

Two kinds of checkpoint fit:

* a segmentation checkpoint (its params hold `backbone`): every array is loaded; the class
  convolutions (`conv_seg` of the decode and auxiliary heads) start fresh when the number of
  classes differs;
* an ImageNet classifier checkpoint of the same backbone (ours, or converted from the official
  `.pth`): its arrays are loaded into `backbone` by name (the segmentation backbone keeps the
  classifier's module names); the classifier's `norm` and `head` are dropped, and `extra_norms`,
  the neck and the heads start fresh.

Anything else (a missing backbone array, a shape that differs, an unknown array) is an error that
lists the arrays, so a wrong checkpoint never half-loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import traverse_util

from biformer_jax.models.from_config import CheckpointMismatchError

CLASSIFIER_ONLY = ("norm", "head")  # classifier arrays with no place in a segmentation backbone
FRESH_IN_BACKBONE = "extra_norms"  # backbone arrays a classifier does not have
CLASS_CONVS = ("decode_head", "auxiliary_head")  # their conv_seg depends on the number of classes
_HINT = (
    "init_from takes a classifier checkpoint of the same backbone variant (biformer_small for *_biformer_small)"
    " or a segmentation checkpoint of the same model; check config.model and the checkpoint's biformer_jax.json."
)


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def merge_weights(
    saved: dict[str, Any],
    fresh: dict[str, Any],
    source: str,
    *,
    class_layers: tuple[tuple[str, str], ...] = tuple((head, "conv_seg") for head in CLASS_CONVS),
    task: str = "segmentation",
    hint: str = _HINT,
) -> tuple[dict[str, Any], dict[str, list]]:
    """{"params", "batch_stats"} with saved's arrays in fresh's tree; and what was loaded / kept fresh.

    `saved` holds host arrays, `fresh` the freshly initialised model's. `class_layers`: (top module,
    layer) pairs whose arrays depend on the number of classes (they start fresh when their shapes
    differ); `task` and `hint` word the error. Raises checkpoint.CheckpointMismatchError listing
    every array that does not fit.
    """
    is_classifier = "backbone" not in saved.get("params", {})
    merged: dict[str, Any] = {}
    report: dict[str, list] = {"loaded": [], "fresh": [], "dropped": []}
    missing, unexpected, mismatched = [], [], []
    for collection in ("params", "batch_stats"):
        want = _flat(fresh.get(collection, {}))
        have = _flat(saved.get(collection, {}))
        if is_classifier:
            have = {("backbone", *k): v for k, v in have.items() if k[0] not in CLASSIFIER_ONLY}
            report["dropped"] += [
                "/".join((collection, *k)) for k in _flat(saved.get(collection, {})) if k[0] in CLASSIFIER_ONLY
            ]
        out = {}
        for key, value in want.items():
            name = "/".join((collection, *key))
            if key in have:
                if tuple(np.shape(have[key])) == tuple(value.shape):
                    out[key] = np.asarray(have[key], dtype=value.dtype)
                    report["loaded"].append(name)
                    continue
                if any(key[0] == top and layer in key for top, layer in class_layers):
                    out[key] = value  # another number of classes: this layer starts fresh
                    report["fresh"].append(name)
                    continue
                mismatched.append(f"{name}: checkpoint {tuple(np.shape(have[key]))}, model {tuple(value.shape)}")
                continue
            fresh_ok = key[0] != "backbone" if is_classifier else False
            fresh_ok = fresh_ok or (is_classifier and any(part.startswith(FRESH_IN_BACKBONE) for part in key))
            if not fresh_ok:
                missing.append(name)
            out[key] = value
            report["fresh"].append(name)
        unexpected += ["/".join((collection, *k)) for k in have if k not in want]
        merged[collection] = traverse_util.unflatten_dict(out) if out else {}
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"{source} (config.init_from, {'a classifier' if is_classifier else 'a ' + task} checkpoint)",
            f"the configured {task} model",
            missing,
            unexpected,
            mismatched,
            hint=hint,
        )
    if not report["loaded"]:
        raise CheckpointMismatchError(f"{source} (config.init_from)", "the model: no array fits", [], [], [], hint=hint)
    return merged, report
