"""Backbones for dense prediction: the classifiers without `norm`/`head`, plus `extra_norms`.

Ported from rayleizhu/BiFormer `semantic_segmentation/models_mm/biformer_mm.py` (`BiFormer_mm`:
a timm `LayerNorm2d`, eps 1e-6, on each of the four stage outputs; keys
`backbone.extra_norms.i.weight/bias`) and maclong01/DeBiFormer `segmentation/debiformer.py`
(its own `LayerNorm2d`: an `nn.LayerNorm` over channels with PyTorch's eps 1e-5, keys
`backbone.extra_norms.i.ln.weight/bias`). Both are the classifier classes themselves with
`features_only=True`, so every classifier key (`downsample_layers.*`, `stages.*`) keeps its
name and an ImageNet checkpoint initialises the backbone by rule.

Call: `backbone.apply(variables, x_nhwc, train=False)` -> four NHWC maps at strides 4, 8,
16, 32 with `embed_dim[i]` channels, each after its extra norm.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn

from biformer_jax.models.biformer import BiFormer
from biformer_jax.models.debiformer import DeBiFormer
from biformer_jax.models.layers import LayerNorm


class _WrappedLayerNorm(nn.Module):
    """DeBiFormer's `LayerNorm2d`: a module holding an `nn.LayerNorm` named `ln`."""

    epsilon: float
    dtype: jax.typing.DTypeLike
    param_dtype: jax.typing.DTypeLike

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return LayerNorm(self.epsilon, self.dtype, self.param_dtype, name="ln")(x)


class BiFormerBackbone(BiFormer):
    """`BiFormer_mm`: BiFormer's stages (features_only) and a LayerNorm per stage output.

    Takes every `BiFormer` argument; `features_only` must stay True (the default here).
    """

    features_only: bool = True
    extra_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        if not self.features_only:
            raise ValueError("BiFormerBackbone has no classifier: leave features_only=True.")
        features = BiFormer.__call__(self, x, train)
        return [
            LayerNorm(self.extra_norm_eps, self.dtype, self.param_dtype, name=f"extra_norms_{i}")(f)
            for i, f in enumerate(features)
        ]


class DeBiFormerBackbone(DeBiFormer):
    """The released DeBiFormer segmentation backbone: stages (features_only) and `extra_norms`.

    Takes every `DeBiFormer` argument; the release's segmentation variants route its topk -2
    blocks to 49 regions (`all_regions_topk=49`, see the variants table) and normalise with
    eps 1e-5.
    """

    features_only: bool = True
    extra_norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        if not self.features_only:
            raise ValueError("DeBiFormerBackbone has no classifier: leave features_only=True.")
        features = DeBiFormer.__call__(self, x, train)
        return [
            _WrappedLayerNorm(self.extra_norm_eps, self.dtype, self.param_dtype, name=f"extra_norms_{i}")(f)
            for i, f in enumerate(features)
        ]


BACKBONES: dict[str, type[nn.Module]] = {"biformer": BiFormerBackbone, "debiformer": DeBiFormerBackbone}


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def build_dense_model(kind: str, name: str, variants: dict[str, dict[str, Any]], cls: type, overrides: dict[str, Any]):
    """`cls(**variants[name])` with `overrides` routed: the model's own fields to it, the backbone's to
    `backbone_args` (dtype / param_dtype to both); a segmentor's or a detector's `create_model`."""
    if name not in variants:
        raise ValueError(f"Unknown {kind} model {name!r}; available: {', '.join(sorted(variants))}.")
    spec = dict(variants[name])
    backbone_args = dict(spec.pop("backbone_args"))
    own = set(cls.__dataclass_fields__) - {"parent", "name", "backbone", "backbone_args"}
    backbone_fields = set(BACKBONES[spec["backbone"]].__dataclass_fields__) - {"parent", "name", "features_only"}
    unknown = sorted(set(overrides) - own - backbone_fields)
    if unknown:
        raise TypeError(
            f"{name} got unknown argument(s) {unknown}; it takes {sorted(own)} and the backbone's "
            f"{sorted(backbone_fields)}."
        )
    for key, value in overrides.items():
        if key in own:
            spec[key] = _freeze(value)
        if key in backbone_fields and (key not in own or key in ("dtype", "param_dtype")):
            backbone_args[key] = _freeze(value)
    spec["backbone_args"] = tuple(sorted((k, _freeze(v)) for k, v in backbone_args.items()))
    return cls(**spec)
