"""The frame BiFormer and DeBiFormer share: stem, four stages of blocks, classifier head.

A conv stem (two 3x3/2 convs) and three 3x3/2 downsampling convs, each followed by
BatchNorm, feed four stages of blocks; a final BatchNorm, global average pooling and a
Linear head give the logits. Both models' official constructors take the same argument
names, which these functions read from the model (`model.depth`, `model.embed_dim`, ...);
a model supplies only its block class and what its blocks take beyond the common fields.
Module names follow the official state_dict (`downsample_layers_0` holds `0`, `1`, `3`, `4`
as `downsample_layers.0.{0,1,3,4}`; block j of stage i is `stages_i_j`), so the helpers
declare their modules directly on the calling model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from biformer_jax.models.layers import BatchNorm, Dtype, check_nhwc_input, conv2d, dense, per_stage
from biformer_jax.models.routing import RoutingSettings
from biformer_jax.ops.fused import gelu

PER_STAGE_ARGS = (
    "depth",
    "embed_dim",
    "kv_per_wins",
    "topks",
    "qk_dims",
    "kv_downsample_ratios",
    "kv_downsample_kernels",
    "mlp_ratios",
)


class Stem(nn.Module):
    """conv3x3/2 -> BN -> GELU -> conv3x3/2 -> BN (official downsample_layers.0)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_group_size: int = 0  # BatchNorm statistics per group of this many images (layers.BatchNorm)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dt, pdt, half = self.dtype, self.param_dtype, self.dim // 2
        x = conv2d(half, 3, x.shape[-1], "0", dt, pdt, stride=2, padding=1)(x)
        x = gelu(BatchNorm(group_size=self.bn_group_size, dtype=dt, param_dtype=pdt, name="1")(x, train))
        x = conv2d(self.dim, 3, half, "3", dt, pdt, stride=2, padding=1)(x)
        return BatchNorm(group_size=self.bn_group_size, dtype=dt, param_dtype=pdt, name="4")(x, train)


class Downsample(nn.Module):
    """conv3x3/2 -> BN between stages (official downsample_layers.1-3)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_group_size: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv2d(self.dim, 3, x.shape[-1], "0", self.dtype, self.param_dtype, stride=2, padding=1)(x)
        bn = BatchNorm(group_size=self.bn_group_size, dtype=self.dtype, param_dtype=self.param_dtype, name="1")
        return bn(x, train)


def stochastic_depth_rates(drop_path_rate: float, depth: Sequence[int]) -> list[float]:
    """torch.linspace(0, rate, sum(depth)) as the official code computes it (float32)."""
    return [float(r) for r in np.linspace(0.0, drop_path_rate, sum(depth), dtype=np.float32)]


def feature_info(embed_dim: Sequence[int]) -> tuple[dict[str, Any], ...]:
    """timm's `feature_info`: stage i has embed_dim[i] channels at stride 4 * 2**i."""
    return tuple({"num_chs": c, "reduction": 4 * 2**i, "module": f"stages_{i}"} for i, c in enumerate(embed_dim))


def check_official_args(model: nn.Module, source: str) -> None:
    """The argument checks both constructors share; `source` names the code they mirror."""
    for name in PER_STAGE_ARGS:
        per_stage(getattr(model, name), name)
    if model.representation_size:
        raise ValueError(
            f"representation_size is not supported: {source}'s pre-logits layer is built with a list "
            "width and cannot run; leave it None."
        )
    if model.pe not in (None, "none"):
        raise ValueError(f"pe={model.pe!r}: {source} only accepts None / 'none'.")
    check_scan_remat(model.scan_remat)


def check_head_split(model: nn.Module, stages: Sequence[int]) -> None:
    for i in stages:
        qk = model.qk_dims[i] or model.embed_dim[i]
        if qk < model.head_dim or qk % model.head_dim:
            raise ValueError(
                f"stage {i}: qk_dim {qk} is not a multiple of head_dim {model.head_dim}, so it cannot be "
                "split into heads; choose head_dim dividing qk_dims."
            )


def stage_routing(model: nn.Module, i: int, **extra: Any) -> RoutingSettings:
    """Stage i's `RoutingSettings` from the official constructor arguments on `model`."""
    qk_dim = model.qk_dims[i] or model.embed_dim[i]
    return RoutingSettings(
        num_heads=qk_dim // model.head_dim,
        n_win=model.n_win,
        qk_dim=qk_dim,
        qk_scale=model.qk_scale,
        kv_per_win=model.kv_per_wins[i],
        kv_downsample_ratio=model.kv_downsample_ratios[i],
        kv_downsample_mode=model.kv_downsample_mode,
        topk=model.topks[i],
        param_attention=model.param_attention,
        param_routing=model.param_routing,
        diff_routing=model.diff_routing,
        soft_routing=model.soft_routing,
        side_dwconv=model.side_dwconv,
        auto_pad=model.auto_pad,
        attn_impl=model.attn_impl,
        dwconv_impl=model.dwconv_impl,
        **extra,
    )


# Rematerialisation inside a scanned stage's body (`model.scan_remat`): what each block keeps
# for the backward pass. A stage in `use_checkpoint_stages` keeps nothing ("nothing"), as the
# official per-block checkpointing does.
SCAN_REMAT = {
    "none": None,  # no recomputation: every residual kept, as the unrolled model keeps them
    "nothing": jax.checkpoint_policies.nothing_saveable,  # only the block inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # matmul outputs kept, the rest recomputed
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_scan_remat(value: str) -> None:
    if value not in SCAN_REMAT:
        raise ValueError(f"scan_remat={value!r}: use one of {sorted(SCAN_REMAT)}.")


def run_stages(
    model: nn.Module, x: jax.Array, train: bool, block_cls: type[nn.Module], stage_kwargs: Callable[[int], dict]
) -> list[jax.Array]:
    """Stem and downsampling layers, then the blocks of each stage; returns the four stage maps.

    Each block gets the common official arguments of its stage plus `stage_kwargs(i)`. In
    train mode a stage with drop path draws one key from the 'drop_path' rng and block j
    seeds its masks with fold_in(key, j), unrolled or scanned alike (so both draw the same).
    Must be called from `model`'s compact `__call__` (the modules are declared on it).
    """
    dt, pdt = model.dtype, model.param_dtype
    dp_rates = stochastic_depth_rates(model.drop_path_rate, model.depth)
    features, cur = [], 0
    for i in range(4):
        if i == 0:
            x = Stem(model.embed_dim[0], dt, pdt, model.bn_group_size, name="downsample_layers_0")(x, train)
        else:
            x = Downsample(model.embed_dim[i], dt, pdt, model.bn_group_size, name=f"downsample_layers_{i}")(x, train)
        kwargs = dict(
            dim=model.embed_dim[i],
            layer_scale_init_value=model.layer_scale_init_value,
            mlp_ratio=model.mlp_ratios[i],
            mlp_dwconv=model.mlp_dwconv,
            before_attn_dwconv=model.before_attn_dwconv,
            pre_norm=model.pre_norm,
            dtype=dt,
            param_dtype=pdt,
            **stage_kwargs(i),
        )
        names = [f"stages_{i}_{j}" for j in range(model.depth[i])]
        rates = dp_rates[cur : cur + model.depth[i]]
        key = model.make_rng("drop_path") if train and any(r > 0 for r in rates) else None
        remat = i in model.use_checkpoint_stages
        stacked = stacked_variables(model, i, names)
        if scans_blocks(model) and len(names) > 1:
            block = block_cls(drop_path=0.0, parent=None, **kwargs)
            if train:
                policy = "nothing" if remat else model.scan_remat
                x = scanned_train_blocks(model, x, block, names, rates, key, policy, stacked)
            else:
                x = scanned_blocks(model, x, block, names, stacked)
        elif stacked is not None:
            raise ValueError(
                f"stage {i}'s variables are stacked (the training layout of a model that scans its blocks, "
                f"`stages_{i}`), but this pass runs the blocks one by one (scan_blocks=False, initialisation "
                "or recorded intermediates): give it the per-block layout, models.block_layout.unstack(variables)."
            )
        else:
            # remat per stage, the official use_checkpoint_stages; `train` is static.
            cls = nn.remat(block_cls, static_argnums=(2,)) if remat else block_cls
            for j, name in enumerate(names):
                block_key = None if key is None else jax.random.fold_in(key, j)
                x = cls(drop_path=rates[j], name=name, **kwargs)(x, train, block_key)
        cur += model.depth[i]
        features.append(x)
    return features


def scans_blocks(model: nn.Module) -> bool:
    """Whether `run_stages` scans over each stage's blocks: with `model.scan_blocks`, in training
    and at inference.

    Initialisation (which creates each block's variables under its own name) and a pass that
    records intermediates (the routes, for `visualize`: `sow` needs each block bound to the
    model) keep the unrolled blocks; they compute the same function.
    """
    return model.scan_blocks and not model.is_initializing() and not model.is_mutable_collection("intermediates")


def stacked_variables(model: nn.Module, i: int, names: Sequence[str]) -> Optional[dict[str, Any]]:
    """Stage i's variables in the stacked layout (`models.block_layout`: {collection: tree of
    (depth, ...) leaves} under `stages_i`), or None when the model holds them per block."""
    key = f"stages_{i}"
    if len(names) < 2 or key not in model.variables.get("params", {}):
        return None
    return {col: tree[key] for col, tree in model.variables.items() if key in tree}


def scanned_blocks(
    model: nn.Module,
    x: jax.Array,
    block: nn.Module,
    names: Sequence[str],
    stacked: Optional[dict[str, Any]] = None,
) -> jax.Array:
    """Inference: the blocks `names` of `model` applied in turn, as one `lax.scan` over the block index.

    The same function as calling them one after another (every block of a stage has the same
    structure; only drop path differs, which inference does not apply). XLA then compiles one
    block per stage instead of `depth` copies, and the loop reuses one block's buffers: at the
    ADE20K test scale (BiFormer-S, 512 x 2048) compiler memory, temporaries and peak RSS all
    shrink (README, "Speed and memory"). The variables keep their per-block layout (checkpoints
    and converters are unchanged): step j picks block j's with `lax.switch`, a copy of one
    block's weights, where stacking the stage's weights for the scan would copy them all.
    Not for differentiation: the transpose of that switch gives every iteration a cotangent
    for every block's weights (depth^2 work); training takes `scanned_train_blocks`.
    `block`: an unbound block module (parent=None) with the stage's arguments. `stacked`: the
    stage's variables in the stacked layout (a training state's), scanned over as they are.
    """
    if stacked is not None:

        def stacked_step(h, variables):  # block j's variables, sliced by the scan
            return block.apply(variables, h, False), None  # h: (N, H, W, C) -> (N, H, W, C)

        x, _ = jax.lax.scan(stacked_step, x, stacked)
        return x
    per_block = [{col: tree[name] for col, tree in model.variables.items() if name in tree} for name in names]

    def step(h, j):
        variables = jax.lax.switch(j, [lambda p, k=k: p[k] for k in range(len(names))], per_block)  # block j's
        return block.apply(variables, h, False), None  # h: (N, H, W, C) -> (N, H, W, C)

    x, _ = jax.lax.scan(step, x, jnp.arange(len(names)))
    return x


def scanned_train_blocks(
    model: nn.Module,
    x: jax.Array,
    block: nn.Module,
    names: Sequence[str],
    rates: Sequence[float],
    key: Optional[jax.Array],
    remat: str,
    stacked: Optional[dict[str, Any]] = None,
) -> jax.Array:
    """Train mode: the blocks `names` of `model` as one `lax.scan`, differentiable in linear cost.

    The stage's variables come `stacked` along a new leading axis (the trainer's state keeps
    that layout: `models.block_layout`), or are stacked here from the per-block layout
    (`jnp.stack`: its transpose slices the stacked cotangent back, one block's worth per block),
    and are fed to the scan as inputs with the block index and the per-block drop-path rate; block j seeds
    its masks with fold_in(key, j) as the unrolled stage does, and a rate of 0 draws a mask
    that keeps every sample, so both compute the same function from the same rng. Mutable
    collections of the blocks (a BatchNorm's statistics) come back stacked and are written to
    each block's own entry (stacked: the stage's). The body is rematerialised with `SCAN_REMAT[remat]`.
    x: (N, H, W, C) -> (N, H, W, C).
    """
    per_block = stacked is None
    if per_block:
        cols = [col for col, tree in model.variables.items() if names[0] in tree]
        stacked = {
            col: jax.tree.map(lambda *a: jnp.stack(a), *(model.variables[col][n] for n in names)) for col in cols
        }
    mutable = [col for col in stacked if col != "params" and model.is_mutable_collection(col)]

    def step(h, xs):
        j, variables, rate = xs
        blk, block_key = (block, None) if key is None else (block.clone(drop_path=rate), jax.random.fold_in(key, j))
        if not mutable:
            return blk.apply(variables, h, True, block_key), {}
        return blk.apply(variables, h, True, block_key, mutable=mutable)  # (h, {col: block j's})

    if SCAN_REMAT[remat] is not None:
        step = jax.checkpoint(step, policy=SCAN_REMAT[remat], prevent_cse=False)  # scan already keeps CSE out
    rates = jnp.asarray(rates)  # (depth,): the default float dtype, as DropPath's Python rate becomes
    x, updates = jax.lax.scan(step, x, (jnp.arange(len(names)), stacked, rates))
    for col in mutable:
        if not per_block:
            model.put_variable(col, names[0].rsplit("_", 1)[0], updates[col])  # stages_i, stacked
            continue
        for j, name in enumerate(names):
            model.put_variable(col, name, jax.tree.map(lambda a, j=j: a[j], updates[col]))
    return x


def classifier(model: nn.Module, x: jax.Array, train: bool, head_fan_in: Any = None) -> jax.Array:
    """Final BatchNorm, global average pooling, dropout and the Linear head -> float32 logits
    (float64 for a float64 model).

    `head_fan_in`: PyTorch's default Linear init for the head (see `layers.dense`)."""
    dt, pdt = model.dtype, model.param_dtype
    x = BatchNorm(group_size=model.bn_group_size, dtype=dt, param_dtype=pdt, name="norm")(x, train)
    out_dtype = jnp.promote_types(dt, jnp.float32)
    x = jnp.mean(x.astype(out_dtype), axis=(1, 2)).astype(dt)  # (N, C)
    if model.num_classes > 0:
        x = nn.Dropout(model.drop_rate, deterministic=not train)(x)
        x = dense(model.num_classes, "head", dt, pdt, torch_init_fan_in=head_fan_in)(x)
    return x.astype(out_dtype)


def forward(
    model: nn.Module,
    x: jax.Array,
    train: bool,
    return_features: bool,
    block_cls: type[nn.Module],
    stage_kwargs: Callable[[int], dict],
    head_fan_in: Any = None,
):
    """The whole model on an NHWC batch: the stage maps (`features_only`), the logits, or
    `(logits, stage maps)` (`return_features`)."""
    check_nhwc_input(x, model.in_chans, type(model).__name__)
    features = run_stages(model, x.astype(model.dtype), train, block_cls, stage_kwargs)
    if model.features_only:
        return features
    logits = classifier(model, features[-1], train, head_fan_in)
    return (logits, features) if return_features else logits
