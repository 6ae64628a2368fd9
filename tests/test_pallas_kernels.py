"""The Pallas routed-attention kernels without their hardware.

- numerics: the Mosaic GPU kernels in the Mosaic GPU interpreter and the Mosaic TPU kernels
  in TPU interpret mode against 'gather', values and gradients, odd region sizes included;
- lowering: the kernels at every BiFormer stage shape lower for 'cuda' and 'tpu'
  (`jax.export`, no compile: Mosaic's lowering checks block shapes, layouts and the
  shared-memory budget, which is where the old GPU kernel failed);
- dispatch: one exported artifact carries the CPU, CUDA and TPU code and runs on CPU;
  'auto' follows the lowering platform; under a mesh the kernels shard_map over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from support.golden import rel_l2
from test_routed_attention import assert_all_close, make_inputs, value_and_grads

from biformer_jax.ops import pallas_gpu_routed_attention as gpu
from biformer_jax.ops.pallas_dispatch import kernels_see_mesh, pallas_routed_attention
from biformer_jax.ops.routed_attention import AUTO_KERNEL_RULES, resolve_impl, routed_attention

KERNEL_CALLS = ("mosaic_gpu_v2", "tpu_custom_call")
EXPORT_CHECKS = [jax.export.DisabledSafetyCheck.custom_call(name) for name in KERNEL_CALLS]


def export(fn, *args, platforms=("cpu", "cuda", "tpu")):
    return jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=EXPORT_CHECKS)(*args)


def attention_and_grad(impl, heads, scale, r_idx, **kw):
    """(q, kv, w) -> (out, d sum(out^2) / d (q, kv)) with routed attention `impl`."""

    def fn(q, kv, w):
        def loss(q, kv):
            return jnp.sum(jnp.square(routed_attention(q, kv, r_idx, w, num_heads=heads, scale=scale, impl=impl)))

        out = routed_attention(q, kv, r_idx, w, num_heads=heads, scale=scale, impl=impl)
        return out, jax.grad(loss, argnums=(0, 1))(q, kv)

    return fn


# (N, P, Tq, Tkv, Cqk, Cv, heads, topk), soft routing
ODD_CASES = {
    # 49 query tokens (BiFormer-S stage 4 at 224) and 16 keys: both padded to one 64-row tile
    "tq49_tkv16_soft": ((1, 4, 49, 16, 32, 32, 1, 2), True),
    # 70 tokens: two query and two key tiles, the second masked; head widths 8 and 16 padded to 16
    "two_tiles_narrow_heads": ((1, 2, 70, 70, 16, 32, 2, 2), False),
}


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("name", list(ODD_CASES))
def test_kernels_in_interpreter_match_gather_on_odd_regions(name, variant):
    shape, soft = ODD_CASES[name]
    q, kv, r_idx, r_weight, ct = make_inputs(shape, soft, seed=4)
    heads = shape[6]
    want = value_and_grads(
        lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=heads, scale=0.3), q, kv, r_idx, r_weight, ct
    )
    got = value_and_grads(
        lambda q, kv, w: pallas_routed_attention(
            q, kv, r_idx, w, num_heads=heads, scale=0.3, interpret=True, variant=variant
        ),
        q,
        kv,
        r_idx,
        r_weight,
        ct,
    )
    assert_all_close(got, want, 1e-5, f"{variant} {name}")


def test_gpu_kernel_in_interpreter_bfloat16():
    """bfloat16 operands (the GPU's float32 path too): within the bound the XLA paths keep."""
    shape = (1, 3, 64, 64, 32, 32, 1, 2)
    q, kv, r_idx, r_weight, ct = make_inputs(shape, soft=True, seed=5, dtype=jnp.bfloat16)

    def fn(variant):
        return lambda q, kv, w: pallas_routed_attention(
            q, kv, r_idx, w, num_heads=1, scale=0.3, interpret=variant is not None, variant=variant
        )

    got = value_and_grads(fn("gpu"), q, kv, r_idx, r_weight, ct)
    assert all(a.dtype == jnp.bfloat16 for a in got)
    f32 = [a.astype(jnp.float32) for a in (q, kv, r_weight)]
    want = value_and_grads(fn("xla"), f32[0], f32[1], r_idx, f32[2], ct)
    assert_all_close([a.astype(jnp.float32) for a in got], want, 2e-2, "gpu bf16")


def test_pallas_on_cpu_runs_the_xla_path(monkeypatch):
    """impl='pallas' outside interpret mode lowers for CPU to the XLA gather path: jitted or not.

    Which path ran is observed, not inferred from equal values: the op goes through the
    per-platform dispatch primitive, its CPU program holds no custom call (no kernel), the
    kernels' Python is never traced (it would raise here) and the dispatch's XLA path is."""
    from biformer_jax.ops import pallas_dispatch

    def refuse(*args, **kwargs):
        raise AssertionError("a Pallas kernel was traced for CPU")

    for module, name in [(pallas_dispatch.gpu, "attend_forward"), (pallas_dispatch.gpu, "attend_backward")] + [
        (pallas_dispatch.tpu, "tpu_forward"),
        (pallas_dispatch.tpu, "tpu_backward"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    traced = []
    xla_forward = pallas_dispatch._xla_forward
    monkeypatch.setattr(pallas_dispatch, "_xla_forward", lambda *a: traced.append(1) or xla_forward(*a))
    q, kv, r_idx, r_weight, ct = make_inputs((2, 9, 4, 4, 16, 24, 2, 3), soft=True)
    pallas = lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=2, scale=0.3, impl="pallas")  # noqa: E731
    assert "routed_attention_per_platform" in str(jax.make_jaxpr(pallas)(q, kv, r_weight))
    assert "custom_call" not in jax.jit(pallas).lower(q, kv, r_weight).as_text()
    assert traced
    want = value_and_grads(
        lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=2, scale=0.3), q, kv, r_idx, r_weight, ct
    )
    fn = lambda q, kv, w: routed_attention(q, kv, r_idx, w, num_heads=2, scale=0.3, impl="pallas")  # noqa: E731
    assert_all_close(value_and_grads(jax.jit(fn), q, kv, r_idx, r_weight, ct), want, 1e-5, "jit")
    assert rel_l2(fn(q, kv, r_weight), want[0]) < 1e-5  # eager


def test_one_artifact_carries_cpu_cuda_and_tpu_code_and_runs_on_cpu():
    q, kv, r_idx, r_weight, _ = make_inputs((2, 4, 49, 16, 64, 64, 2, 2), soft=True, seed=6)
    exported = export(attention_and_grad("pallas", 2, 0.2, r_idx), q, kv, r_weight)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    text = exported.mlir_module()
    assert text.count("mosaic_gpu_v2") == 3  # forward, dq, dk/dv
    assert text.count("tpu_custom_call") == 3
    exported = jax.export.deserialize(exported.serialize())  # as a serving artifact
    got = exported.call(q, kv, r_weight)  # the CPU branch of the same artifact
    want = attention_and_grad("gather", 2, 0.2, r_idx)(q, kv, r_weight)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_l2(g, w) < 1e-5


# (Tq, Tkv, heads, topk) of the routed stages: BiFormer at 224 (n_win 7: 64/16/4 tokens per
# region, and 49 queries over one region as at stage 4) and at 512 with n_win 8 (256/64/16).
STAGE_SHAPES = {
    "224_s1": (49, 64, 64, 2, 1),
    "224_s2": (49, 16, 16, 4, 4),
    "224_s3": (49, 4, 4, 8, 16),
    "224_s4": (1, 49, 49, 16, 1),
    "512_s1": (64, 256, 256, 2, 1),
    "512_s2": (64, 64, 64, 4, 4),
    "512_s3": (64, 16, 16, 8, 16),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("stage", list(STAGE_SHAPES))
def test_kernels_lower_for_cuda_and_tpu_at_biformer_shapes(stage, dtype):
    p, tq, tkv, heads, topk = STAGE_SHAPES[stage]
    dt = jnp.dtype(dtype)
    q = jax.ShapeDtypeStruct((2, p, tq, 32 * heads), dt)
    kv = jax.ShapeDtypeStruct((2, p, tkv, 64 * heads), dt)
    r_idx = jnp.zeros((2, p, topk), jnp.int32)
    exported = export(attention_and_grad("pallas", heads, 0.1, r_idx), q, kv, None, platforms=("cuda", "tpu"))
    text = exported.mlir_module()
    assert text.count("mosaic_gpu_v2") == 3 and text.count("tpu_custom_call") == 3


def test_gpu_kernel_shared_memory_is_far_under_the_hopper_budget():
    # Mosaic GPU's lowering enforces the 227 KiB limit (the tests above lower); this pins the
    # design: tens of KiB per instance whatever the region size, since tiles are 64 rows
    # (BiFormer head width 32: forward 28 KiB, dq 32 KiB, dk/dv 40 KiB).
    for dtype in (jnp.float32, jnp.bfloat16):
        assert max(gpu.smem_bytes(32, 32, dtype).values()) <= 40 * 1024


def test_auto_follows_the_lowering_platform():
    # BiFormer-S at 224: stage 1 (64 tokens) takes the kernel on GPU/TPU; stage 2 (16 tokens,
    # 16x padded work on the GPU) stays 'gather'; stage 3 stays 'masked'; CPU never.
    s1 = ((8, 49, 64, 64), (8, 49, 64, 128), 1)
    s2 = ((8, 49, 16, 128), (8, 49, 16, 256), 4)
    s3 = ((8, 49, 4, 256), (8, 49, 4, 512), 16)
    assert [resolve_impl("auto", *s1, platform=p) for p in ("cpu", "cuda", "tpu")] == ["gather", "pallas", "pallas"]
    assert [resolve_impl("auto", *s2, platform=p) for p in ("cpu", "cuda", "tpu")] == ["gather"] * 3
    assert [resolve_impl("auto", *s3, platform=p) for p in ("cpu", "cuda", "tpu")] == ["masked"] * 3
    assert resolve_impl("auto", *s1, platform="rocm") == "gather"
    assert set(AUTO_KERNEL_RULES) == {"cuda", "tpu"}

    q, kv, r_idx, _, _ = make_inputs((1, 4, 64, 64, 64, 64, 2, 1), soft=False)
    exported = export(attention_and_grad("auto", 2, 0.1, r_idx), q, kv, None)
    assert exported.mlir_module().count("mosaic_gpu_v2") == 3
    cpu_only = export(attention_and_grad("auto", 2, 0.1, r_idx), q, kv, None, platforms=("cpu",))
    assert "custom_call" not in cpu_only.mlir_module()  # lowered for CPU alone: no kernel


def test_under_a_mesh_the_kernels_split_the_batch():
    """Mosaic kernels cannot be partitioned by XLA: under a (data 2 x fsdp 4) mesh the op runs
    in a shard_map over the batch, so a sharded step lowers for TPU and GPU and, on CPU,
    still equals 'gather'. (Auto axes, as the trainer's mesh has.)"""
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:8])
    q, kv, r_idx, _, _ = make_inputs((8, 4, 64, 64, 64, 64, 2, 1), soft=False, seed=7)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q, kv, r_idx = (jax.device_put(a, batch) for a in (q, kv, r_idx))
    fn = kernels_see_mesh(attention_and_grad("pallas", 2, 0.1, r_idx), mesh)
    exported = jax.export.export(jax.jit(fn), platforms=("cuda", "tpu"), disabled_checks=EXPORT_CHECKS)(q, kv, None)
    assert exported.nr_devices == 8
    assert "mosaic_gpu_v2" in exported.mlir_module() and "tpu_custom_call" in exported.mlir_module()
    got = jax.jit(fn)(q, kv, None)
    want = attention_and_grad("gather", 2, 0.1, r_idx)(q, kv, None)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_l2(np.asarray(g), np.asarray(w)) < 1e-5


def test_bad_variant_names_the_choices():
    q, kv, r_idx, _, _ = make_inputs((1, 4, 4, 4, 8, 8, 2, 2), soft=False)
    with pytest.raises(ValueError, match="variant='cuda' is not one of"):
        pallas_routed_attention(q, kv, r_idx, None, num_heads=2, scale=1.0, variant="cuda")
