"""Sharded training on 8 simulated CPU devices: data parallel (8) and data x FSDP (2 x 4) equal 1 device.

Each mesh trains the same micro BiFormer (EMA on) for a few steps on the same global batches
through `train_lib`'s own setup, initial state and jitted step; per-step losses and the final
parameters must match the single-device run up to float32 reduction-order noise.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from support import train_testlib

from biformer_jax import data, tasks
from biformer_jax.training import checkpoint, checkpoint_manager, sharding, train_lib

NUM_STEPS = 3
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring
CACHE_HIT_EVENT = "/jax/compilation_cache/compile_time_saved_sec"  # a compile the persistent cache answered
# Tolerances: a sharded step sums the same numbers in another order (per-device partial sums,
# then an all-reduce), so float32 results differ in the last bits. AdamW divides each gradient
# by its own running RMS, which turns pure rounding noise (the gradient of a conv bias that feeds
# BatchNorm is analytically zero) into +-lr steps; the test raises eps to 1e-3 so such noise
# stays noise (~1e-9 gradients -> ~lr * 1e-6 updates) while real gradients (~1e-2) still train.
# Measured (2-core CPU, jax 0.10.2): data 8: losses 1.1e-7 relative, parameters 7.5e-8 absolute;
# data 2 x fsdp 4: 1.1e-7 and 1.2e-7 (with eps 1e-8 a pre-BatchNorm conv bias drifts by 4e-4).
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("compilation_cache")


def _config(data_axis: int, fsdp_axis: int, **overrides):
    # fsdp_min_size 64: small enough that the micro model's kernels are sharded over fsdp.
    return train_testlib.micro_config(
        **{"mesh.data": data_axis, "mesh.fsdp": fsdp_axis, "sharding.fsdp_min_size": 64, "optim.eps": 1e-3, **overrides}
    )


def _train(config, num_devices: int, tmp_path, num_steps: int = NUM_STEPS):
    """(per-step losses, final state, the Setup) of num_steps steps on the first num_devices devices."""
    run = train_lib.setup(config, tasks.get(config), devices=jax.devices()[:num_devices])
    manager = checkpoint_manager.create_manager(tmp_path, config.checkpoint, best_metric="")
    try:
        state = train_lib.initial_state(config, manager, run.init_fn, run.abstract, run.shardings, task=run.task)
    finally:
        manager.close()
    train_step = train_lib.make_train_step(config, run)
    batches = data.train_iterator(
        config.data,
        seed=config.seed,
        start_step=0,
        global_batch_size=config.global_batch_size,
        process_index=0,
        process_count=1,
    )
    losses = []
    for _ in range(num_steps):
        state, metrics = train_step(state, sharding.global_batch(next(batches), run.mesh))
        losses.append(float(metrics.compute()["loss"]))
    return losses, state, run


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    losses, state, _ = _train(_config(1, 1), 1, tmp_path_factory.mktemp("one"))
    return losses, jax.device_get(state.params), jax.device_get(state.ema_params)


@pytest.mark.parametrize("mesh", [(8, 1), (2, 4)], ids=["data8", "data2xfsdp4"])
def test_sharded_run_equals_single_device(mesh, single_device, tmp_path):
    ref_losses, ref_params, ref_ema = single_device
    losses, state, run = _train(_config(*mesh), 8, tmp_path)
    assert dict(run.mesh.shape) == {"data": mesh[0], "fsdp": mesh[1]}

    loss_diff = max(abs(a / b - 1) for a, b in zip(losses, ref_losses))
    param_diff = max(
        float(np.max(np.abs(np.asarray(g) - w)))
        for g, w in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params))
    )
    print(f"mesh {mesh}: max relative loss difference {loss_diff:.2e}, max abs param difference {param_diff:.2e}")
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    assert len(set(losses)) == NUM_STEPS  # the model really trained (losses move)
    for got, want in ((state.params, ref_params), (state.ema_params, ref_ema)):
        jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=PARAM_ATOL), got, want)

    # The state stays laid out by the rules after a (donated) step.
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in leaves}
    if mesh[1] == 1:  # pure data parallelism: everything replicated
        assert all(spec == PartitionSpec() for spec in specs.values())
    else:
        kernel = state.params["stages_2_0"]["mlp"]["0"]["kernel"]  # (64, 192) in the micro model
        assert kernel.sharding.spec == PartitionSpec(None, "fsdp")
        assert kernel.addressable_shards[0].data.shape == (64, 192 // 4)
        assert state.params["head"]["bias"].sharding.spec == PartitionSpec()  # 10 elements: replicated
        sharded = [k for k, spec in specs.items() if "fsdp" in tuple(spec)]
        assert len(sharded) >= 10, specs
        # Adam's moments and the EMA follow the parameters' layout.
        adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
        mu = adam[0].mu["stages_2_0"]["mlp"]["0"]["kernel"]
        assert mu.sharding.spec == kernel.sharding.spec
        assert state.ema_params["stages_2_0"]["mlp"]["0"]["kernel"].sharding.spec == kernel.sharding.spec


PRODUCTION_EPS = 1e-8  # configs/common.py: config.optim.eps
PRODUCTION_EPS_STEPS = 6  # test_multiprocess's note: at 1e-8 the drift showed from step 3 on
PRODUCTION_EPS_LOSS_RTOL = 1e-5
# Measured over 6 steps (2-core CPU, jax 0.10.2), data 2 x fsdp 4 vs 1 device: losses 2.2e-7
# relative; parameters 2.29e-5 at most (the V columns of stage 3's qkv kernel; every other leaf
# <= 2.4e-6), EMA 1.07e-5; the analytically-zero entries left out drift by 2.76e-3 (lr 2e-3).
# Leaving out only the pre-BatchNorm conv biases, stage 2's and 3's MLP output biases differed
# by 5.5e-4 and 1.8e-4, stage 3's q/k and LePE taps by 2.3e-5: hence the full list.
PRODUCTION_EPS_PARAM_ATOL = 1e-4


def test_sharded_run_at_the_production_eps_equals_single_device(tmp_path_factory):
    """At AdamW's production eps, PRODUCTION_EPS_STEPS steps on data 2 x fsdp 4 equal 1 device: the
    losses and every parameter and EMA entry except those whose gradient is analytically zero
    (train_testlib.ANALYTICALLY_ZERO_GRADIENT: they take +-lr steps from rounding noise; their
    drift is printed).
    """
    config = {"optim.eps": PRODUCTION_EPS}
    steps = PRODUCTION_EPS_STEPS
    ref, ref_state, _ = _train(_config(1, 1, **config), 1, tmp_path_factory.mktemp("one"), steps)
    losses, state, _ = _train(_config(2, 4, **config), 8, tmp_path_factory.mktemp("eight"), steps)
    loss_diff = max(abs(a / b - 1) for a, b in zip(losses, ref))
    got, want = jax.device_get((state.params, ref_state.params))
    params = train_testlib.param_differences(got, want)
    ema = train_testlib.param_differences(*jax.device_get((state.ema_params, ref_state.ema_params)))
    assert len(params) >= 70  # all but the 11 leaves made only of analytically-zero entries
    worst = max(params, key=params.get)
    print(
        f"production eps, {steps} steps: max relative loss difference {loss_diff:.2e}; {len(params)} parameters, "
        f"max abs difference {params[worst]:.2e} ({worst}); EMA {max(ema.values()):.2e}; "
        f"analytically-zero entries drift {train_testlib.zero_gradient_drift(got, want):.2e}"
    )
    np.testing.assert_allclose(losses, ref, rtol=PRODUCTION_EPS_LOSS_RTOL)
    assert len(set(losses)) == steps
    assert params[worst] <= PRODUCTION_EPS_PARAM_ATOL, f"{worst} differs by {params[worst]:.2e}"
    worst_ema = max(ema, key=ema.get)
    assert ema[worst_ema] <= PRODUCTION_EPS_PARAM_ATOL, f"EMA {worst_ema} differs by {ema[worst_ema]:.2e}"


def test_state_is_created_sharded_and_donated(tmp_path):
    config = _config(2, 4)
    run = train_lib.setup(config, tasks.get(config))
    manager = checkpoint_manager.create_manager(tmp_path, config.checkpoint, best_metric="")
    try:
        state = train_lib.initial_state(config, manager, run.init_fn, run.abstract, run.shardings, task=run.task)
    finally:
        manager.close()
    # Created by jit(init, out_shardings=...): every leaf already has its rule's sharding.
    jax.tree.map(lambda x, s: assert_same_sharding(x, s), state, run.shardings)

    local = next(
        data.train_iterator(config.data, seed=0, start_step=0, global_batch_size=16, process_index=0, process_count=1)
    )
    batch = sharding.global_batch(local, run.mesh)
    assert batch["image"].shape == (16, 32, 32, 3)
    assert {s.data.shape[0] for s in batch["image"].addressable_shards} == {2}  # 16 rows over 8 devices
    np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])

    kernel = state.params["stages_2_0"]["mlp"]["0"]["kernel"]
    new_state, _ = train_lib.make_train_step(config, run)(state, batch)
    assert kernel.is_deleted()  # donated: the step reused its buffers
    assert not new_state.params["stages_2_0"]["mlp"]["0"]["kernel"].is_deleted()


def test_checkpoint_of_sharded_state_saves_without_compiling_and_restores(tmp_path):
    """A data x FSDP state saves with no compilation (Orbax's replica-parallel write compiles a
    slicing program per array and device: the first save() took ~9 s to return on this mesh)
    and restores bit-exactly onto the same shardings."""
    config = _config(2, 4)
    run = train_lib.setup(config, tasks.get(config))
    manager = checkpoint_manager.create_manager(tmp_path, config.checkpoint, best_metric="")
    compiles = []

    def on_event(event, duration, **kwargs):
        if event in (BACKEND_COMPILE_EVENT, CACHE_HIT_EVENT):
            compiles.append(duration)

    try:
        state = train_lib.initial_state(config, manager, run.init_fn, run.abstract, run.shardings, task=run.task)
        jax.block_until_ready(state)
        jax.monitoring.register_event_duration_secs_listener(on_event)
        try:
            checkpoint.save_train_state(manager, state, step=1, meta=run.meta)
            manager.wait_until_finished()
        finally:
            jax.monitoring.unregister_event_duration_listener(on_event)
    finally:
        manager.close()
    assert compiles == [], f"the save compiled {len(compiles)} programs ({sum(compiles):.1f} s)"

    restored = checkpoint.restore_train_state(checkpoint.resolve(tmp_path), run.abstract)
    jax.tree.map(lambda x, s: assert_same_sharding(x, s), restored, run.shardings)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)


def test_stacked_state_shards_like_its_blocks_and_checkpoints_per_block(tmp_path):
    """A model that scans its blocks trains on each stage's blocks stacked (`block_layout`): on
    data 2 x fsdp 4 each stacked leaf is sharded as one block's leaf, never along the block axis;
    a step keeps that layout; the checkpoint holds the per-block names and shapes of the unrolled
    model's state and restores bit-exactly onto the stacked shardings."""
    kw = {"model_kwargs.depth": (1, 3, 1, 1)}
    config = _config(2, 4, scan_blocks=True, **kw)
    run = train_lib.setup(config, tasks.get(config))
    per_block = train_lib.setup(_config(2, 4, scan_blocks=False, **kw), tasks.get(config))
    assert "stages_1" in run.abstract.params and "stages_1_0" not in run.abstract.params
    stacked_specs = jax.tree_util.tree_leaves_with_path(run.shardings.params["stages_1"])
    block_specs = jax.tree.leaves(per_block.shardings.params["stages_1_0"])
    assert [s.spec for _, s in stacked_specs] == [PartitionSpec(None, *s.spec) for s in block_specs]
    assert sum("fsdp" in tuple(s.spec) for _, s in stacked_specs) >= 4, stacked_specs

    manager = checkpoint_manager.create_manager(tmp_path, config.checkpoint, best_metric="")
    try:
        state = train_lib.initial_state(config, manager, run.init_fn, run.abstract, run.shardings, task=run.task)
        batch = next(
            data.train_iterator(
                config.data, seed=0, start_step=0, global_batch_size=16, process_index=0, process_count=1
            )
        )
        state, _ = train_lib.make_train_step(config, run)(state, sharding.global_batch(batch, run.mesh))
        jax.tree.map(lambda x, s: assert_same_sharding(x, s), state, run.shardings)
        checkpoint.save_train_state(manager, state, step=1, meta=run.meta)
        manager.wait_until_finished()
    finally:
        manager.close()
    ref = checkpoint.resolve(tmp_path)
    for item, want in (
        ("variables", per_block.abstract.variables),
        ("ema_variables", per_block.abstract.ema_variables),
    ):
        assert checkpoint.mismatches(checkpoint.saved_shapes(ref, item), want) == ([], [], [])
    train_item = {
        "step": per_block.abstract.step,
        "opt_state": per_block.abstract.opt_state,
        "rng": per_block.abstract.rng,
    }
    assert checkpoint.mismatches(checkpoint.saved_shapes(ref, "train"), train_item) == ([], [], [])

    restored = checkpoint.restore_train_state(ref, sharding.with_shardings(run.abstract, run.shardings))
    jax.tree.map(lambda x, s: assert_same_sharding(x, s), restored, run.shardings)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)


def assert_same_sharding(x, s):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.shape, x.sharding, s)


@pytest.mark.parametrize(
    ("shape", "fsdp", "min_size", "spec"),
    [
        ((3, 3, 64, 128), 4, 64, PartitionSpec(None, None, None, "fsdp")),  # largest dim
        ((192, 64), 4, 64, PartitionSpec("fsdp", None)),
        ((10, 6), 4, 8, PartitionSpec()),  # no dimension divisible by 4
        ((14, 6), 4, 8, PartitionSpec()),
        ((12, 6), 4, 8, PartitionSpec("fsdp", None)),
        ((128,), 4, 256, PartitionSpec()),  # under fsdp_min_size
        ((1024, 512), 1, 1, PartitionSpec()),  # fsdp = 1: data parallel, replicated
    ],
)
def test_fsdp_rule(shape, fsdp, min_size, spec):
    assert sharding.leaf_spec(shape, fsdp, min_size) == spec


def test_bad_mesh_and_batch_fail_clearly():
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        sharding.create_mesh({"data": 2, "fsdp": 3})
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.create_mesh({"model": 2})
    mesh = sharding.create_mesh({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="global_batch_size=12 must be divisible"):
        sharding.check_batch_size(12, mesh, "config.global_batch_size")
    with pytest.raises(ValueError, match=r"grad_accum_steps=4 x 8 devices = 32"):
        sharding.check_grad_accum(16, 4, mesh)
