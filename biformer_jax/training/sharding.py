"""Mesh, sharding rules and global batches: data parallel and FSDP under one `jax.jit`.

The mesh has two named axes, ('data', 'fsdp'), sized from `config.mesh` (-1: all remaining
devices). The batch is split over both axes (every device holds a different slice of the global
batch). A state leaf (param, optimiser moment, EMA copy) is sharded over 'fsdp' along its largest
dimension divisible by the fsdp size when it holds at least `fsdp_min_size` elements, and
replicated otherwise; with fsdp = 1 everything is replicated (plain data parallelism).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from biformer_jax.models import block_layout

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def create_mesh(mesh_cfg: Mapping[str, int], devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; one axis may be -1 (the rest of the devices)."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(mesh_cfg) - set(AXES))
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {unknown}; the axes are {list(AXES)}.")
    sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh={dict(mesh_cfg)}: at most one axis may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"config.mesh={dict(mesh_cfg)} does not divide the {len(devices)} devices.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh={dict(mesh_cfg)} needs {math.prod(sizes)} devices but {len(devices)} are "
            "available; set one axis to -1 to use all of them."
        )
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_size_per_device_multiple(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def leaf_spec(shape: tuple[int, ...], fsdp_size: int, fsdp_min_size: int) -> PartitionSpec:
    """FSDP rule for one array: shard its largest fsdp-divisible dimension, else replicate."""
    if fsdp_size <= 1 or math.prod(shape) < fsdp_min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp_min_size: int) -> Any:
    """NamedShardings for every leaf of an (abstract) state, by `leaf_spec`.

    A leaf of a stacked stage (`models.block_layout`) is sharded as one block's leaf would be,
    never along its block axis (the scan slices that axis, and checkpoints unstack it)."""
    fsdp = mesh.shape["fsdp"]

    def spec(path, x) -> PartitionSpec:
        shape = tuple(x.shape)
        if block_layout.in_stacked_stage(path):
            return PartitionSpec(None, *leaf_spec(shape[1:], fsdp, fsdp_min_size))
        return leaf_spec(shape, fsdp, fsdp_min_size)

    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec(p, x)), abstract_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry shardings (what Orbax restores against)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's slice of the batch (rows [p*B_local, (p+1)*B_local)) -> global arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str) -> None:
    n = batch_size_per_device_multiple(mesh)
    if global_batch_size % n or global_batch_size % jax.process_count():
        raise ValueError(
            f"{what}={global_batch_size} must be divisible by the {n} devices of the batch axes "
            f"and the {jax.process_count()} processes; pick a multiple of {n}."
        )


def check_grad_accum(global_batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """Each of the k micro-batches must still split evenly over the devices of the batch axes."""
    k, n = int(grad_accum_steps), batch_size_per_device_multiple(mesh)
    if k < 1:
        raise ValueError(f"config.grad_accum_steps={grad_accum_steps} must be >= 1 (1: no accumulation).")
    if global_batch_size % (k * n):
        raise ValueError(
            f"config.global_batch_size={global_batch_size} must be divisible by grad_accum_steps={k} x "
            f"{n} devices = {k * n}, so that every micro-batch splits evenly over the devices."
        )
