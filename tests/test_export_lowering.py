"""Whole models with attn_impl='pallas' lower for GPU and TPU, from CPU, without compiling.

Each test exports one function (the inference logits and the training-mode gradient of
every parameter) with `jax.export` for cpu, cuda and tpu in one artifact: Mosaic GPU and
Mosaic TPU lower every kernel there (block shapes, layouts, shared-memory budget), so a
kernel that a GPU or TPU would reject fails here. Then the training step that
`train.py --config=configs/biformer_s.py` builds (its step function, its state shardings)
on an 8-device (data 2 x fsdp 4) mesh, for tpu and cuda. Nothing is compiled or run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from biformer_jax import data, models, tasks
from biformer_jax.training import sharding, train_lib

KERNEL_CALLS = ("mosaic_gpu_v2", "tpu_custom_call")
EXPORT_CHECKS = [jax.export.DisabledSafetyCheck.custom_call(name) for name in KERNEL_CALLS]

# model, image side, constructor overrides, routed stages with distinct region shapes
# BiFormer-S unrolled is not a case of its own: it is BiFormer-T's blocks (the same widths, heads,
# windows and top-k, so the same kernel shapes) at a greater depth; S runs scanned below.
CASES = {
    "biformer_tiny_224": ("biformer_tiny", 224, {}, 3),
    "biformer_base_224": ("biformer_base", 224, {}, 3),
    "biformer_small_512_seg": ("biformer_small", 512, dict(n_win=8, auto_pad=True), 3),
    # each stage's blocks as one lax.scan, inference (lax.switch) and training (stacked weights)
    "biformer_small_224_scanned": ("biformer_small", 224, dict(scan_blocks=True), 3),
    # DeBiFormer-T: the routed (agent) attention of -S/-B, at half the depth (-S took 400-700 s
    # to trace on the loaded 2-core CI machine, -T's depth 1/1/4/1 a fraction of it)
    "debiformer_tiny_224": ("debiformer_tiny", 224, {}, 3),
}


def infer_and_grad(model):
    def fn(variables, images):
        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"drop_path": jax.random.key(1), "dropout": jax.random.key(2)},
            )
            return jnp.mean(logits.astype(jnp.float32))

        return model.apply(variables, images, train=False), jax.grad(loss)(variables["params"])

    return fn


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_model_with_pallas_kernels_exports_for_cpu_cuda_and_tpu(case, dtype):
    name, side, overrides, routed_shapes = CASES[case]
    model = models.create_model(name, attn_impl="pallas", dtype=jnp.dtype(dtype), **overrides)
    images = jax.ShapeDtypeStruct((2, side, side, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    exported = jax.export.export(
        jax.jit(infer_and_grad(model)), platforms=("cpu", "cuda", "tpu"), disabled_checks=EXPORT_CHECKS
    )(variables, images)
    text = exported.mlir_module()
    # Each distinct region shape lowers its forward, dq and dk/dv kernels once per platform.
    assert text.count("mosaic_gpu_v2") >= 3 * routed_shapes
    assert text.count("tpu_custom_call") >= 3 * routed_shapes
    logits, grads = exported.out_avals[0], exported.out_avals[1:]
    assert logits.shape == (2, 1000) and len(grads) == len(jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_biformer_s_sharded_training_step_exports_for_tpu_and_cuda(monkeypatch, scan_blocks):
    """The trainer's own setup and jitted step for configs/biformer_s.py (attn_impl 'auto':
    the kernel in stage 1 on GPU/TPU), unrolled (the config's default) and scanned, state sharded
    as it shards it, on data 2 x fsdp 4."""
    from configs import biformer_s

    config = biformer_s.get_config()
    config.scan_blocks = scan_blocks
    config.mesh.data, config.mesh.fsdp = 2, 4
    # No dataset here: the sizes ImageNet-1K would report.
    info = data.DatasetInfo(num_classes=1000, num_train_examples=1281167, num_eval_examples=50000, image_size=224)
    task = tasks.get(config)
    monkeypatch.setattr(task, "dataset_info", lambda cfg: info)
    run = train_lib.setup(config, task, devices=jax.devices()[:8])
    step = train_lib.make_train_step(config, run)
    batch_sharding = sharding.batch_sharding(run.mesh)
    b = config.global_batch_size
    batch = {
        "image": jax.ShapeDtypeStruct((b, 224, 224, 3), jnp.float32, sharding=batch_sharding),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding),
    }
    state = sharding.with_shardings(run.abstract, run.shardings)
    exported = jax.export.export(step, platforms=("tpu", "cuda"), disabled_checks=EXPORT_CHECKS)(state, batch)
    assert exported.nr_devices == 8
    text = exported.mlir_module()
    # Stage 1's forward, dq and dk/dv kernels, each lowered once (scanned or not: its 4 unrolled
    # blocks share one lowered function per kernel).
    assert text.count("mosaic_gpu_v2") == 3 and text.count("tpu_custom_call") == 3
    # Shardy annotations: the mesh, FSDP-sharded state and the batch split over both axes.
    assert 'sdy.mesh @mesh = <["data"=2, "fsdp"=4]>' in text
    assert '[{"data", "fsdp"}, {}, {}, {}]' in text  # images (B, H, W, C)
    assert text.count('{"fsdp"}') > 100  # parameters, EMA and AdamW moments
