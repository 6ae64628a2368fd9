"""mmsegmentation's `EncoderDecoder`: backbone -> (neck) -> decode head (+ auxiliary head).

Submodules are named as an mmseg checkpoint names them (`backbone`, `neck`, `decode_head`,
`auxiliary_head`), so `biformer_jax.convert` maps its keys by rule. The backbone is a
`BiFormerBackbone` / `DeBiFormerBackbone` built from `backbone_args` (the classifier's
constructor arguments, as pairs so the module stays hashable; `create_model` fills them
from keyword overrides).

Call: `model.apply(variables, x_nhwc, train=False)` -> (N, ceil(H/4), ceil(W/4), num_classes)
float32 decode-head logits (before any resize to the input size);
`return_aux=True` -> `(logits, aux_logits)`, the auxiliary head's at stride 16 (UperNet;
None for a model without an auxiliary head, so one loss function serves both);
`return_features=True` appends the backbone's four NHWC maps (after `extra_norms`) to the
returned tuple. In train mode pass rngs `dropout` and `drop_path`, and make `batch_stats`
mutable (the heads' BatchNorm on batch statistics: SyncBN over the global batch under
`jax.jit`; the backbone's over groups of its `bn_group_size` images when set).

`head_init` is how the heads start (`heads.py`): 'init_weights' where the official training
script called mmseg's `init_weights()` (DeBiFormer), 'constructor' where it did not (BiFormer);
the variants table sets it per family.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from biformer_jax.models.layers import Dtype
from biformer_jax.models.segmentation.backbone import BACKBONES
from biformer_jax.models.segmentation.fpn import FPN, FPNHead
from biformer_jax.models.segmentation.heads import FCNHead, check_head_init
from biformer_jax.models.segmentation.uper import UPerHead

DECODE_HEADS = ("fpn", "uper")


class EncoderDecoder(nn.Module):
    """A segmentation model: `backbone` family + `decode_head` kind ('fpn': FPN neck + FPNHead,
    'uper': UPerHead), with an auxiliary `FCNHead` when `auxiliary_head` is True."""

    backbone: str = "biformer"
    backbone_args: tuple[tuple[str, Any], ...] = ()
    decode_head: str = "fpn"
    num_classes: int = 150
    channels: Optional[int] = None  # decode head width; None: mmseg's 128 (FPNHead) / 512 (UPerHead)
    neck_channels: int = 256
    pool_scales: Sequence[int] = (1, 2, 3, 6)
    dropout_ratio: float = 0.1
    auxiliary_head: bool = False
    aux_channels: int = 256
    aux_in_index: int = 2
    conv_impl: str = "auto"
    head_init: str = "init_weights"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def backbone_config(self) -> dict[str, Any]:
        return dict(self.backbone_args)

    @property
    def n_win(self) -> int:  # for shape inference (convert.dummy_input)
        return self.backbone_config.get("n_win", 7)

    @property
    def in_chans(self) -> int:
        return self.backbone_config.get("in_chans", 3)

    @property
    def embed_dim(self) -> tuple[int, ...]:
        return tuple(self.backbone_config.get("embed_dim", BACKBONES[self.backbone].embed_dim))

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} is not one of {sorted(BACKBONES)}.")
        if self.decode_head not in DECODE_HEADS:
            raise ValueError(f"decode_head={self.decode_head!r} is not one of {DECODE_HEADS}.")
        if self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes}: a segmentation model needs at least one class.")

    def setup(self):
        self.validate()
        check_head_init(self.head_init)
        kw = dict(conv_impl=self.conv_impl, head_init=self.head_init, dtype=self.dtype, param_dtype=self.param_dtype)
        bb = {"dtype": self.dtype, "param_dtype": self.param_dtype, **self.backbone_config}
        self.backbone_net = BACKBONES[self.backbone](**bb, name="backbone")
        if self.decode_head == "fpn":
            self.neck = FPN(self.neck_channels, name="neck", **kw)
            self.decode = FPNHead(
                self.num_classes, self.channels or 128, dropout_ratio=self.dropout_ratio, name="decode_head", **kw
            )
        else:
            self.decode = UPerHead(
                self.num_classes,
                self.channels or 512,
                tuple(self.pool_scales),
                self.dropout_ratio,
                name="decode_head",
                **kw,
            )
        if self.auxiliary_head:
            self.aux = FCNHead(
                self.num_classes,
                self.aux_channels,
                self.aux_in_index,
                dropout_ratio=self.dropout_ratio,
                name="auxiliary_head",
                **kw,
            )

    def extract_features(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """The backbone's four maps after `extra_norms` (NHWC, strides 4 to 32)."""
        return self.backbone_net(x, train)

    def __call__(self, x: jax.Array, train: bool = False, return_aux: bool = False, return_features: bool = False):
        features = self.extract_features(x, train)
        inputs = self.neck(features) if self.decode_head == "fpn" else features
        logits = self.decode(inputs, train)
        out: tuple = (logits,)
        # init always builds the auxiliary head, so its parameters exist for training.
        aux = None
        if self.auxiliary_head and (return_aux or self.is_initializing()):
            aux = self.aux(features, train)
        if return_aux:
            out += (aux,)
        if return_features:
            out += (features,)
        return out[0] if len(out) == 1 else out
