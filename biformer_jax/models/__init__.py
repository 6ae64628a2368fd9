"""Model zoo: `create_model(name, **overrides)` over the variant tables beside each model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from biformer_jax.models.biformer import BIFORMER_VARIANTS, BiFormer
from biformer_jax.models.debiformer import DEBIFORMER_VARIANTS, DeBiFormer
from biformer_jax.models.detection import DETECTION_VARIANTS, build_detection_model
from biformer_jax.models.segmentation import SEGMENTATION_VARIANTS, EncoderDecoder, build_segmentation_model

# name -> (module class, the official variant's constructor arguments)
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "biformer": (BiFormer, {}),
    **{name: (BiFormer, kw) for name, kw in BIFORMER_VARIANTS.items()},
    "debiformer": (DeBiFormer, {}),
    **{name: (DeBiFormer, kw) for name, kw in DEBIFORMER_VARIANTS.items()},
}


def list_models() -> list[str]:
    return sorted([*_REGISTRY, *SEGMENTATION_VARIANTS, *DETECTION_VARIANTS])


def _freeze(value: Any) -> Any:
    # Flax module fields must be hashable: lists from configs become tuples.
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def collect_routes(intermediates: Any) -> list:
    """The region indices sown by every routing module, in forward order.

    `intermediates` is the collection returned by
    `model.apply(..., mutable=["intermediates"])`; each entry is (N, regions, topk).
    """
    routes: list = []

    def visit(tree):
        for key, value in tree.items():  # insertion order is call order
            if key == "route":
                routes.extend(value)
            elif isinstance(value, Mapping):
                visit(value)

    visit(intermediates.get("intermediates", intermediates))
    return routes


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds a registered model; `overrides` replace the variant's constructor arguments.

    `create_model("biformer", **kwargs)` is the bare official `BiFormer(**kwargs)`, and
    `create_model("debiformer", **kwargs)` the released `DeBiFormer(**kwargs)`. Segmentation
    models (`sfpn_biformer_small`, `upernet_debiformer_base`, ...) and detection models
    (`retinanet_biformer_small`, ...) take their own arguments and the backbone's
    (`biformer_jax.models.segmentation`, `biformer_jax.models.detection`).
    """
    if name in SEGMENTATION_VARIANTS:
        return build_segmentation_model(name, **overrides)
    if name in DETECTION_VARIANTS:
        return build_detection_model(name, **overrides)
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; available: {', '.join(list_models())}.")
    cls, defaults = _REGISTRY[name]
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{name} got unknown argument(s) {unknown}; it takes {sorted(fields)}.")
    kwargs = {k: _freeze(v) for k, v in {**defaults, **overrides}.items()}
    return cls(**kwargs)


__all__ = ["BiFormer", "DeBiFormer", "EncoderDecoder", "collect_routes", "create_model", "list_models"]
