"""A model's architecture as a comparable record: what a checkpoint's `model` + `model_kwargs` build.

Checkpoints record the `create_model` name and the keyword arguments they were made with.
`architecture(name, kwargs)` builds the module (no weights) and reads back every constructor
field, defaults included, so `biformer_tiny` and `biformer` with BiFormer-T's arguments compare
equal, and a setting that keeps every array shape (`topks`, `n_win`, `pre_norm`, `soft_routing`,
`auto_pad`, `qk_scale`, ...) still shows as a difference. Fields that do not change the function
the weights compute are left out: compute dtype, rematerialisation, drop rates, initial values
and implementation choices.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Constructor fields that leave the trained function unchanged (how it is computed or trained).
NOT_ARCHITECTURE = frozenset(
    {
        "parent",
        "name",
        "dtype",
        "param_dtype",
        "use_checkpoint_stages",
        "drop_path_rate",
        "drop_rate",
        "dropout_ratio",  # a segmentation head's dropout: training only
        "layer_scale_init_value",  # only the initial value: its presence shows in the arrays
        "attn_impl",
        "dwconv_impl",
        "conv_impl",
        "scan_blocks",  # the same blocks, run as one lax.scan per stage
        "features_only",
        "bn_group_size",  # which images share BatchNorm statistics in training
        "head_init",  # only the initial values of the segmentation heads
        "scan_remat",  # what the scanned training step recomputes
    }
)


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def architecture(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every architecture field of `create_model(name, **kwargs)`, defaults filled in.

    A segmentation model's backbone arguments are fields of their own ("backbone_args.topks"), so
    a difference names the one setting that differs.
    """
    from biformer_jax import models  # here, not at import: models imports this package

    module = models.create_model(name, **dict(kwargs))
    fields = [f for f in type(module).__dataclass_fields__ if f not in NOT_ARCHITECTURE]
    out = {"class": type(module).__name__}
    for f in fields:
        if f == "backbone_args":  # EncoderDecoder: ((name, value), ...)
            out.update({f"{f}.{k}": _plain(v) for k, v in getattr(module, f) if k not in NOT_ARCHITECTURE})
        else:
            out[f] = _plain(getattr(module, f))
    return out


def differences(recorded: Mapping[str, Any], configured: Mapping[str, Any], *, allow: Iterable[str] = ()) -> list[str]:
    """'field: checkpoint X, config Y' for every architecture field that differs.

    `recorded` and `configured` are {"model": name, "model_kwargs": {...}} records (a
    checkpoint's meta, `model_meta(config, ...)`); fields named in `allow` are not compared (a
    backbone field by its own name too: "topks" allows "backbone_args.topks").
    """
    theirs = architecture(recorded["model"], recorded.get("model_kwargs", {}))
    ours = architecture(configured["model"], configured.get("model_kwargs", {}))
    allowed = set(allow)
    return [
        f"{key}: checkpoint {theirs.get(key)!r}, config {ours.get(key)!r}"
        for key in sorted(set(theirs) | set(ours))
        if key not in allowed and key.rsplit(".", 1)[-1] not in allowed and theirs.get(key) != ours.get(key)
    ]
