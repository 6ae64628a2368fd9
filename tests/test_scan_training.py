"""Scanned training (issue 27): with `scan_blocks`, each stage of depth > 1 trains as one
`lax.scan` and computes the unrolled model's loss, every gradient and the BatchNorm updates
from the same rng (drop path and dropout on), in float32 and float64."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import train_testlib, xla_flags

from biformer_jax import data, models, tasks
from biformer_jax.models import biformer, block_layout, stages
from biformer_jax.models.layers import BatchNorm
from biformer_jax.training import checkpoint, checkpoint_manager, optim, train_lib
from biformer_jax.training import metrics as metrics_lib

# model, constructor overrides (a stage of depth >= 3, drop path and dropout on), input (H, W)
CASES = {
    "biformer": ("biformer_micro", dict(depth=(1, 1, 3, 1), drop_path_rate=0.4, drop_rate=0.3), (64, 64)),
    "debiformer": ("debiformer_micro", dict(depth=(1, 1, 3, 1), drop_path_rate=0.4, drop_rate=0.3), (64, 64)),
}
# float32: measured up to 1.45e-6 (batchnorm_biformer, downsample_layers_3 scale, full suite in a
# fresh clone 2026-12-05; ~12 float32 ulps of the largest gradient).
# float64: DeBiFormer's deformable positions, logits and position bias are computed at
# promote_types(dtype, float32) (they were float32 always, which gave 1.1e-7 here).
TOLERANCE = {"float32": 3e-6, "float64": 1e-12}


class BatchNormBlock(biformer.Block):
    """A BiFormer block with a BatchNorm in front: a block whose statistics train."""

    @nn.compact
    def __call__(self, x, train=False, drop_key=None):
        return super().__call__(BatchNorm(dtype=self.dtype, name="bn")(x, train), train, drop_key)


class BatchNormBiFormer(biformer.BiFormer):
    @nn.compact
    def __call__(self, x, train=False, return_features=False):
        return stages.forward(self, x, train, return_features, BatchNormBlock, self.stage_kwargs)


def build(name, overrides, **kw):
    if name == "batchnorm_biformer":
        return BatchNormBiFormer(**{**biformer.BIFORMER_VARIANTS["biformer_micro"], **overrides, **kw})
    return models.create_model(name, **overrides, **kw)


def train_fn(model):
    """(params, batch_stats, x, y, key) -> (loss, new batch_stats, grads), jitted."""

    def loss(params, batch_stats, x, y, key):
        rngs = {"drop_path": jax.random.fold_in(key, 0), "dropout": jax.random.fold_in(key, 1)}
        variables = {"params": params, "batch_stats": batch_stats}
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
        return jnp.mean(jnp.sum(jnp.square(logits - y), axis=-1)), updates["batch_stats"]

    def fn(params, batch_stats, x, y, key):
        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params, batch_stats, x, y, key)
        return value, stats, grads

    return jax.jit(fn)


def at_default_level(jitted, *args):
    """`jitted` compiled once for `args` with XLA's defaults (backend level 3, fusion emitters),
    not the suite's -O0 with legacy emitters (support/xla_flags.py), for DeBiFormer in float64.
    Measured with the fusion emitters (2-core CPU, jax 0.10.2, the two programs' largest gradient
    difference per backend level): -O0 5.7e-9, -O1 4.1e-9, -O2 5.7e-17,
    -O3 5.8e-17; at -O0 the loss and the BatchNorm statistics are bit-identical and only the
    gradients (largest in the early layers) differ, which fits a backward that meets a kink (such
    as the deformable sampling's floor) on different sides; not pinned down. BiFormer's float64
    programs agree at -O0 (4.4e-17) and compile there (25.7 s of CPU against 41.9 s at -O3).
    DeBiFormer's float64 case takes dwconv_impl='conv' (XLA's depthwise convolution, not the CPU
    default of shifted sums that the float32 case checks; the scan is the same either way): its
    two programs compile in 104 s of CPU instead of 129 s and agree to 5.9e-17 either way
    (measured, 2-core CPU; the case 89 -> 70 s alone). -O0 with it: 5.7e-9 still."""
    return jitted.lower(*args).compile(xla_flags.DEFAULT_BACKEND_LEVEL)


def at_suite_level(jitted, *args):
    """`jitted` compiled once for `args` at the suite's level (float32)."""
    return jitted.lower(*args).compile()


def with_fusion_emitters(jitted, *args):
    """`jitted` compiled once for `args` at the suite's -O0 with XLA:CPU's default (fusion)
    emitters, for BiFormer in float64. Under the legacy emitters the suite uses elsewhere
    (support/xla_flags.py), both programs' float64 gradients move by up to 2.3e-7 of the largest
    one (stage 3's MLP kernels of BiFormer micro; the scanned and unrolled programs then differ
    by 2.0e-7, DeBiFormer's by 5.1e-11 at level 3), while with the fusion emitters they agree to
    4.4e-17: measured, scratch, 2-core CPU, jax 0.10.2. Standalone float64 erf, exp, tanh, GELU,
    dots and sums compile to the same values under both emitters; the cause is not pinned down."""
    return jitted.lower(*args).compile(xla_flags.FUSION_EMITTERS)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize(
    "case, dtype",
    [
        ("biformer", "float32"),
        ("biformer", "float64"),
        ("debiformer", "float32"),
        ("debiformer", "float64"),
        ("batchnorm_biformer", "float32"),
    ],
)
def test_scanned_training_step_is_the_unrolled_one(case, dtype):
    """The DeBiFormer cases take about 45 s (float32) and 70-90 s (float64) in the suite: two
    DeBiFormer training steps (forward and backward, a stage of 3 blocks) compiled, float64 at
    XLA's default level (see at_default_level; the float32 case alone: 81 s there, 60 s at -O0)."""
    name, overrides, hw = CASES["biformer" if case == "batchnorm_biformer" else case]
    if (case, dtype) == ("debiformer", "float64"):  # the smaller program: see at_default_level
        overrides = {**overrides, "dwconv_impl": "conv"}
    name = "batchnorm_biformer" if case == "batchnorm_biformer" else name
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        unrolled = build(name, overrides, num_classes=5, dtype=dt, param_dtype=dt)
        scanned = build(name, overrides, num_classes=5, dtype=dt, param_dtype=dt, scan_blocks=True)
        x = jax.random.normal(jax.random.key(1), (4, *hw, 3), dt)
        y = jax.random.normal(jax.random.key(2), (4, 5), dt)
        variables = train_testlib.random_variables(unrolled, seed=3, image_size=hw, scale=0.2)
        args = (variables["params"], variables["batch_stats"], x, y)
        compiled = {"float32": at_suite_level, "float64": with_fusion_emitters}[dtype]
        compiled = at_default_level if (case, dtype) == ("debiformer", "float64") else compiled
        step = compiled(train_fn(unrolled), *args, jax.random.key(4))
        scanned_fn = train_fn(scanned)  # traced once: compiled here, its jaxpr read below
        scanned_step = compiled(scanned_fn, *args, jax.random.key(4))
        want, got = step(*args, jax.random.key(4)), scanned_step(*args, jax.random.key(4))
        other_draw = step(*args, jax.random.key(7))[0]

        assert jax.tree.structure(got) == jax.tree.structure(want)  # per-block names, as on disk
        assert rel(other_draw, want[0]) > 1e-3  # drop path and dropout really change the loss
        # Relative error per array; the conv biases that feed a BatchNorm have an analytic
        # gradient of 0 (rounding noise), so an array is measured against the largest gradient
        # where its own norm is smaller.
        got_leaves, want_leaves = jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
        scale = max(np.linalg.norm(np.asarray(b, np.float64)) for b in jax.tree.leaves(want[2]))
        errors = {
            jax.tree_util.keystr(path): float(
                np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                / max(
                    np.linalg.norm(np.asarray(b, np.float64)),
                    scale if "[2]" == jax.tree_util.keystr(path)[:3] else 1e-300,
                )
            )
            for (path, a), b in zip(got_leaves, want_leaves)
            if np.issubdtype(np.asarray(b).dtype, np.floating)
        }
        assert max(errors.values()) <= TOLERANCE[dtype], sorted(errors.items(), key=lambda e: -e[1])[:5]
        counts = [
            np.asarray(a)
            for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]))
            if a.dtype == b.dtype == np.int32
        ]
        assert counts and all(c == 1 for c in counts) and len(counts) == len(jax.tree.leaves(want[1])) // 3
        if case == "batchnorm_biformer":  # the blocks' own statistics moved, block by block
            stats = got[1]["stages_2_2"]["bn"]["mean"]
            assert not np.allclose(stats, variables["batch_stats"]["stages_2_2"]["bn"]["mean"])

        # One scan per stage of depth > 1 in the training forward pass.
        rngs = {"drop_path": jax.random.key(0), "dropout": jax.random.key(1)}
        forward = jax.make_jaxpr(lambda v, x: scanned.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs))(
            variables, x
        )
        assert str(forward).count("scan[") == sum(d > 1 for d in overrides["depth"])
        # Linear in depth: the weights are stacked and sliced, never picked by lax.switch (a cond
        # whose transpose gives every block's weights a cotangent on every iteration); the
        # only conds are the attention's per-platform choices.
        text = str(jax.make_jaxpr(scanned_fn)(*args, jax.random.key(4)))
        assert text.count("cond[") == text.count("branches_platforms=")


class Preempted(Exception):
    pass


@pytest.mark.usefixtures("compilation_cache")
def test_a_run_resumes_across_the_switch(tmp_path, monkeypatch, micro_config):
    """Steps 1-2 unrolled then 3-4 scanned, and the other way round, give the losses of an
    uninterrupted unrolled run: checkpoints keep the per-block layout either way (a scanned run's
    state keeps its stages stacked, `block_layout`). Then init_from the unrolled run's checkpoint
    puts its weights into a scanned run's stacked state.

    Over 60 s in the suite (about 80-90 s): five trainer runs (straight, and each direction's
    interrupted and resumed run) compiling two step programs (unrolled, scanned); the persistent
    cache serves the repeats."""
    kw = {"model_kwargs.depth": (1, 3, 1, 1), "model_kwargs.drop_path_rate": 0.3}
    config = micro_config(scan_blocks=False, **kw)
    train_lib.train_and_evaluate(config, tmp_path / "straight", tasks.get(config))
    straight = _losses(tmp_path / "straight")
    real_iterator = data.train_iterator

    def dies_after_three(*args, **kwargs):
        for i, batch in enumerate(real_iterator(*args, **kwargs)):
            if i == 3:
                raise Preempted("simulated preemption after 3 steps")
            yield batch

    for first, then in ((False, True), (True, False)):
        workdir = tmp_path / f"scan_{first}_then_{then}"
        monkeypatch.setattr(data, "train_iterator", dies_after_three)
        with pytest.raises(Preempted):
            train_lib.train_and_evaluate(micro_config(scan_blocks=first, **kw), workdir, tasks.get(config))
        assert checkpoint.resolve(workdir).step == 2
        monkeypatch.setattr(data, "train_iterator", real_iterator)
        train_lib.train_and_evaluate(micro_config(scan_blocks=then, **kw), workdir, tasks.get(config))
        resumed = _losses(workdir)
        assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4]
        np.testing.assert_allclose([resumed[s] for s in (1, 2, 3, 4)], [straight[s] for s in (1, 2, 3, 4)], rtol=1e-5)

    # init_from a per-block checkpoint into a scanning model's stacked state: the same weights.
    config = micro_config(scan_blocks=True, init_from=str(tmp_path / "straight"), **kw)
    run = train_lib.setup(config, tasks.get(config))
    manager = checkpoint_manager.create_manager(tmp_path / "init_from", config.checkpoint, best_metric="")
    try:
        state = train_lib.initial_state(config, manager, run.init_fn, run.abstract, run.shardings, task=run.task)
    finally:
        checkpoint_manager.close_manager(manager)
    assert "stages_1" in state.params and "stages_1" in state.ema_params
    want = checkpoint.load_variables(tmp_path / "straight")
    jax.tree.map(np.testing.assert_array_equal, checkpoint.host_variables(state), want)


def _losses(workdir) -> dict[int, float]:
    records = metrics_lib.read_jsonl(workdir / metrics_lib.METRICS_FILE)
    return {step: r["train/loss"] for step, r in records.items() if "train/loss" in r}


def test_stacked_stages_train_and_infer_as_the_per_block_layout():
    """The trainer's layout for a scanning model (`block_layout`: each stage's blocks stacked)
    gives the per-block layout's loss, gradients, BatchNorm updates (a BatchNorm in every block)
    and inference logits, and converts back and forth without loss; the unrolled model refuses it
    with the fix in the message; the weight-decay mask decides per block in either layout."""
    overrides = dict(CASES["biformer"][1], depth=(1, 3, 2, 1))
    scanned = build("batchnorm_biformer", overrides, num_classes=5, scan_blocks=True)
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    y = jax.random.normal(jax.random.key(2), (4, 5))
    variables = train_testlib.random_variables(scanned.clone(scan_blocks=False), seed=3, image_size=(64, 64), scale=0.2)
    stacked = block_layout.stack(variables)
    assert {"stages_1", "stages_2", "stages_0_0", "stages_3_0"} <= set(stacked["params"])
    assert not {"stages_1_0", "stages_2_1", "stages_0", "stages_3"} & set(stacked["params"])
    assert stacked["batch_stats"]["stages_1"]["bn"]["mean"].shape == (3, 32)
    assert block_layout.is_stacked(stacked) and not block_layout.is_stacked(variables)
    assert jax.tree.structure(block_layout.stack(stacked)) == jax.tree.structure(stacked)  # no-ops in their layout
    assert block_layout.unstack(variables) == variables
    jax.tree.map(np.testing.assert_array_equal, block_layout.unstack(stacked), variables)

    fn = train_fn(scanned)
    key = jax.random.key(4)
    want = fn(variables["params"], variables["batch_stats"], x, y, key)
    got = fn(stacked["params"], stacked["batch_stats"], x, y, key)
    assert "stages_1" in got[1] and "stages_1" in got[2]  # statistics and gradients come back stacked
    assert float(got[0]) == float(want[0])
    errors = [rel(a, b) for a, b in zip(jax.tree.leaves(block_layout.unstack(got)), jax.tree.leaves(want))]
    assert max(errors) <= 1e-6, max(errors)
    assert not np.allclose(got[1]["stages_1"]["bn"]["mean"][2], stacked["batch_stats"]["stages_1"]["bn"]["mean"][2])

    logits = jax.jit(lambda v: scanned.apply(v, x, train=False))
    np.testing.assert_allclose(logits(stacked), logits(variables), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"stacked .*block_layout.unstack"):
        scanned.clone(scan_blocks=False).apply(stacked, x, train=False)

    mask = block_layout.per_block_mask(optim.weight_decay_mask)
    assert mask(variables["params"]) == optim.weight_decay_mask(variables["params"])
    stacked_mask = mask(stacked["params"])
    assert stacked_mask["stages_1"]["attn"]["qkv"]["qkv"]["bias"] is False  # 1-D per block, 2-D stacked
    assert stacked_mask["stages_1"]["attn"]["qkv"]["qkv"]["kernel"] is True
    assert stacked_mask == block_layout.stack(optim.weight_decay_mask(variables["params"]), stack_fn=lambda *f: f[0])


def test_the_stacked_decay_mask_traces_without_asking_tracers_for_a_sharding(monkeypatch):
    """Under jit, `per_block_mask` reads the stacked leaves' block shapes without a tracer's
    `.sharding`: a tracer has none, and asking builds an error message that walks the whole program
    being traced (5.6 s over BiFormer-S's 476 stacked leaves in its scanned train step). The mask
    it gives under jit is the one it gives on host arrays."""
    overrides = dict(CASES["biformer"][1], depth=(1, 3, 2, 1))
    model = build("biformer_micro", overrides, num_classes=5)
    stacked = block_layout.stack(train_testlib.random_variables(model, seed=3, image_size=(64, 64), scale=0.2))
    mask = block_layout.per_block_mask(optim.weight_decay_mask)
    asked = []
    tracer_sharding = jax.core.Tracer.sharding
    monkeypatch.setattr(
        jax.core.Tracer, "sharding", property(lambda t: asked.append(t.shape) or tracer_sharding.fget(t))
    )
    traced = []
    jax.make_jaxpr(lambda p: traced.append(mask(p)) or p)(stacked["params"])
    assert not asked, f"asked {len(asked)} tracers for their sharding"
    assert traced == [mask(stacked["params"])] and "stages_1" in traced[0]
