"""Two layouts of the blocks' variables: per block, and stacked per stage.

Per block (block j of stage i under `stages_i_j`, as the official state_dict names it) is the
layout of checkpoints, the converter, `init_from` and every loaded model. Stacked is the training
state's layout for a model that scans its blocks (`scan_blocks`): each stage of depth > 1 keeps
one entry `stages_i` whose every leaf has the block index as a new leading axis, so the scanned
step feeds it to its `lax.scan` as it is, and the optimiser, the EMA, the finite guard and the
norms see one array per stage where they saw one per block (BiFormer-S: 388 state arrays instead
of 2,040). A stage of depth 1 keeps its `stages_i_0`.

Both functions map whole trees (variables, optimiser states, a `TrainState`, abstract shapes):
every dict that holds block (or stage) keys is rewritten, everything else is left alone, and each
is a no-op on a tree already in the target layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_KEY = re.compile(r"stages_(\d+)_(\d+)")  # per block: block j of stage i
STAGE_KEY = re.compile(r"stages_(\d+)")  # stacked: all of stage i's blocks


def scans(model) -> bool:
    """Whether `model` scans its blocks (and so trains on the stacked layout): a classifier's
    `scan_blocks`, or that of a dense model's backbone (`backbone_args`)."""
    if hasattr(model, "scan_blocks"):
        return bool(model.scan_blocks)
    return bool(dict(getattr(model, "backbone_args", ()) or ()).get("scan_blocks", False))


def _has(pattern: re.Pattern, x: Any) -> bool:
    return isinstance(x, dict) and any(isinstance(k, str) and pattern.fullmatch(k) for k in x)


def _stack_leaves(*leaves):
    if all(isinstance(a, np.ndarray) for a in leaves):  # host arrays stay on the host
        return np.stack(leaves)
    return jnp.stack(leaves)


def _stack_dict(d: dict, stack_fn: Callable) -> dict:
    out: dict = {}
    stages: dict[int, dict[int, Any]] = {}
    for key, value in d.items():
        m = BLOCK_KEY.fullmatch(key) if isinstance(key, str) else None
        if m:
            stages.setdefault(int(m[1]), {})[int(m[2])] = value
        else:
            out[key] = value
    for i, blocks in stages.items():
        if sorted(blocks) != list(range(len(blocks))):
            raise ValueError(f"stage {i}'s blocks are {sorted(blocks)}: expected stages_{i}_0 ... without gaps.")
        if len(blocks) == 1:
            out[f"stages_{i}_0"] = blocks[0]
        else:
            out[f"stages_{i}"] = jax.tree.map(stack_fn, *(blocks[j] for j in range(len(blocks))))
    return out


def _unstack_dict(d: dict, take: Callable) -> dict:
    out: dict = {}
    for key, value in d.items():
        if not (isinstance(key, str) and STAGE_KEY.fullmatch(key)):
            out[key] = value
            continue
        depth = {int(a.shape[0]) for a in jax.tree.leaves(value)}
        if len(depth) != 1:
            raise ValueError(f"{key}: stacked leaves of different lengths {sorted(depth)}.")
        for j in range(depth.pop()):
            out[f"{key}_{j}"] = jax.tree.map(lambda a, j=j: take(a, j), value)
    return out


def stack(tree: Any, stack_fn: Callable | None = None) -> Any:
    """Per-block -> stacked: `stages_i_0 ... stages_i_{d-1}` (d > 1) become `stages_i`, every leaf
    (d, *block's shape). Host numpy leaves are stacked with numpy, others with jnp (`stack_fn`
    overrides: leaves... -> stacked leaf)."""
    fn = stack_fn or _stack_leaves
    return jax.tree.map(lambda x: _stack_dict(x, fn) if _is_block_dict(x) else x, tree, is_leaf=_is_block_dict)


def unstack(tree: Any, take: Callable[[Any, int], Any] | None = None) -> Any:
    """Stacked -> per-block: `stages_i` becomes `stages_i_0 ... stages_i_{d-1}`, block j's leaf
    `take(leaf, j)` (default `leaf[j]`; `abstract_take` for shapes)."""
    fn = take or (lambda a, j: a[j])
    return jax.tree.map(lambda x: _unstack_dict(x, fn) if _is_stage_dict(x) else x, tree, is_leaf=_is_stage_dict)


def abstract_take(a: Any, j: int) -> jax.ShapeDtypeStruct:
    """Block j's shape of a stacked leaf (array or ShapeDtypeStruct), with its sharding less the
    block axis (which the FSDP rule never shards: `sharding.state_shardings`)."""
    del j
    # A tracer has no sharding to give, and asking builds an error message that walks the whole
    # program being traced: ~12 ms per leaf in BiFormer-S's scanned train step, 5.6 s over the
    # 476 stacked leaves the weight-decay mask (`per_block_mask`) reads on every trace.
    sharding = None if isinstance(a, jax.core.Tracer) else getattr(a, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(a.shape) - len(sharding.spec))
        if spec[0] is not None:
            raise ValueError(f"a stacked leaf {a.shape} is sharded along its block axis ({sharding.spec}).")
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
    return jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype, sharding=sharding)


def _is_block_dict(x: Any) -> bool:
    return _has(BLOCK_KEY, x)


def _is_stage_dict(x: Any) -> bool:
    return _has(STAGE_KEY, x)


def is_stacked(tree: Any) -> bool:
    """Whether any dict in `tree` holds a stacked stage."""
    return any(_is_stage_dict(x) for x in jax.tree.leaves(tree, is_leaf=_is_stage_dict))


def in_stacked_stage(path: tuple) -> bool:
    """Whether a leaf at `path` (jax.tree_util key path) belongs to a stacked stage (its leading
    axis is the block index)."""
    return any(isinstance(getattr(k, "key", None), str) and STAGE_KEY.fullmatch(k.key) for k in path)


def per_block_mask(mask: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A weight-decay mask (params -> tree of bools) that decides per block in either layout.

    The wrapped `mask` sees the per-block shapes (a stacked bias is still 1-D to it) and names
    (`stages_2_0/...`); a stacked stage takes its blocks' common answer (they share the names
    past `stages_i_j` and the shapes, so they agree)."""

    def wrapped(params):
        if not is_stacked(params):
            return mask(params)
        decisions = mask(unstack(params, take=abstract_take))

        def agree(*flags):
            if len(set(map(bool, flags))) != 1:
                raise ValueError("the weight-decay mask differs between blocks of one stage; it cannot be stacked.")
            return bool(flags[0])

        return stack(decisions, stack_fn=agree)

    return wrapped
