"""BatchNorm as the official DDP runs had it: statistics per group of `bn_group_size` images (one
GPU's batch), running statistics from the first group, and timm ModelEma's EMA of the
`num_batches_tracked` counter (averaged in float32, truncated to an integer)."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from support import required, train_testlib

from biformer_jax import models
from biformer_jax.models.from_config import model_from_config
from biformer_jax.models.layers import BatchNorm
from biformer_jax.training.train_state import ema_update


def _bn_reference(x: np.ndarray, scale, bias, eps=1e-5):
    """nn.BatchNorm2d in train mode on NHWC float64: (output, batch mean, unbiased batch variance)."""
    mean = x.mean((0, 1, 2))
    var = x.var((0, 1, 2))
    n = x.size // x.shape[-1]
    return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var * n / (n - 1)


def test_each_group_is_normalised_alone_and_the_first_sets_the_running_statistics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 4, 5)).astype(np.float32) * np.array([1, 2, 3, 4, 5], np.float32)
    x[2:4] += 3.0  # groups with different statistics, so one set for all would be visibly wrong
    bn = BatchNorm(group_size=2)
    variables = bn.init(jax.random.key(0), x)
    scale = 1 + 0.1 * rng.standard_normal(5).astype(np.float32)
    bias = 0.1 * rng.standard_normal(5).astype(np.float32)
    variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
    y, new = jax.jit(lambda v, x: bn.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)

    for g in range(3):
        want, _, _ = _bn_reference(x[2 * g : 2 * g + 2].astype(np.float64), scale, bias)
        np.testing.assert_allclose(np.asarray(y[2 * g : 2 * g + 2]), want, rtol=1e-5, atol=1e-5)
    _, mean0, var0 = _bn_reference(x[:2].astype(np.float64), scale, bias)
    stats = new["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var0, rtol=1e-5)
    assert int(stats["num_batches_tracked"]) == 1

    # A batch no larger than the group is one group; group_size 0 is the whole batch.
    whole = BatchNorm().apply(variables, x, train=True, mutable=["batch_stats"])[0]
    small = BatchNorm(group_size=8).apply(variables, x, train=True, mutable=["batch_stats"])[0]
    np.testing.assert_array_equal(np.asarray(small), np.asarray(whole))
    np.testing.assert_allclose(np.asarray(whole), _bn_reference(x.astype(np.float64), scale, bias)[0], atol=1e-5)


def test_a_batch_that_does_not_split_into_groups_is_refused():
    bn = BatchNorm(group_size=4)
    x = jnp.zeros((6, 2, 2, 3))
    variables = bn.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"batch of 6 images .* bn_group_size=4"):
        bn.apply(variables, x, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="bn_group_size=-1"):
        BatchNorm(group_size=-1).apply(variables, x, train=True, mutable=["batch_stats"])


@pytest.fixture(scope="module")
def micro_groups():
    """biformer_micro with bn_group_size 2: its variables, a batch of 8 and one train-mode step fn."""
    model = models.create_model("biformer_micro", num_classes=5, bn_group_size=2)
    x = jax.random.normal(jax.random.key(1), (8, 64, 64, 3)) * 2.0 + jnp.arange(8.0)[:, None, None, None]
    variables = train_testlib.random_variables(model, image_size=64)  # numpy noise: no init to compile

    def forward(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    return model, variables, x, jax.jit(forward)


def test_model_groups_are_independent_images_per_gpu(micro_groups):
    """Group g of the batch gives what the model gives on those 2 images alone (one official GPU),
    and the running statistics are the first group's."""
    _, variables, x, forward = micro_groups
    logits, new = forward(variables, x)
    for g in range(4):
        alone, alone_stats = forward(variables, x[2 * g : 2 * g + 2])
        np.testing.assert_allclose(np.asarray(logits[2 * g : 2 * g + 2]), np.asarray(alone), rtol=1e-5, atol=1e-5)
        if g == 0:
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                new,
                alone_stats,
            )


@pytest.mark.parametrize("devices", [8, 2])
def test_model_groups_do_not_depend_on_the_device_count(micro_groups, devices):
    """The same groups (of the global batch) however many devices hold the batch."""
    _, variables, x, forward = micro_groups
    want_logits, want_stats = forward(variables, x)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    replicated = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    logits, stats = forward(replicated, sharded)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), stats, want_stats
    )


# Every official config: BiFormer ImageNet 128 per GPU, DeBiFormer ImageNet 256, DeBiFormer's
# segmentation backbone 2 (samples_per_gpu), BiFormer's segmentation backbone SyncBN (0).
OFFICIAL_GROUPS = {f"configs.{m}_{v}": g for m, g in (("biformer", 128), ("debiformer", 256)) for v in "tsb"}
OFFICIAL_GROUPS |= {
    f"configs.seg.{head}_{m}_{v}": g
    for head in ("sfpn", "upernet")
    for m, g in (("biformer", 0), ("debiformer", 2))
    for v in "sb"
}


@pytest.mark.parametrize("config_module, group", sorted(OFFICIAL_GROUPS.items()))
def test_official_configs_set_the_official_group_size(config_module, group):
    config = importlib.import_module(config_module).get_config()
    assert config.bn_group_size == group
    model = model_from_config(config, num_classes=150)
    if hasattr(model, "backbone_args"):  # segmentation: the backbone's BatchNorms only (heads: SyncBN)
        assert dict(model.backbone_args).get("bn_group_size", 0) == group
    else:
        assert model.bn_group_size == group


def _timm_counter(decay: float, steps: int, start: int = 0) -> list[int]:
    """timm ModelEma on an int64 `num_batches_tracked`: `ema.copy_(ema * decay + (1 - decay) * model)`
    with the model's counter at 1, 2, ... (PyTorch: int64 x Python float is float32; copy_ truncates)."""
    torch = required.torch("the timm EMA counter is checked against PyTorch's arithmetic")
    ema = torch.tensor(start, dtype=torch.int64)
    out = []
    for k in range(1, steps + 1):
        ema.copy_(ema * decay + (1.0 - decay) * torch.tensor(start + k, dtype=torch.int64))
        out.append(int(ema))
    return out


@pytest.mark.parametrize("decay, steps, start", [(0.9, 60, 0), (0.99, 400, 0), (0.99996, 200, 40000)])
def test_ema_of_num_batches_tracked_follows_timm(decay, steps, start):
    want = _timm_counter(decay, steps, start)
    update = jax.jit(lambda e, n: ema_update(e, n, decay))
    ema = {"bn": {"num_batches_tracked": jnp.asarray(start, jnp.int32), "mean": jnp.zeros(3)}}
    got = []
    for k in range(1, steps + 1):
        model = {"bn": {"num_batches_tracked": jnp.asarray(start + k, jnp.int32), "mean": jnp.ones(3)}}
        ema = update(ema, model)
        got.append(int(ema["bn"]["num_batches_tracked"]))
    assert ema["bn"]["num_batches_tracked"].dtype == jnp.int32
    assert got == want
    assert got[-1] < start + steps  # averaged, not copied from the model
