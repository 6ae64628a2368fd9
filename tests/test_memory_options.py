"""Memory and precision options: gradient accumulation, bf16 compute, per-stage remat."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import train_testlib

from biformer_jax import tasks
from biformer_jax.models import from_config
from biformer_jax.tasks.classification import steps
from biformer_jax.training import train_lib
from biformer_jax.training.train_state import init_train_state

pytestmark = pytest.mark.usefixtures("compilation_cache")


class _NoBatchNorm(nn.Module):
    """Conv -> GELU -> pool -> Dense: per-example computation, so micro-batches change nothing."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.gelu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))  # (N, 10)


def _identity_mix(rng, images, labels):
    return images, jax.nn.one_hot(labels, 10)


def test_grad_accumulation_equals_one_full_batch_step():
    model, tx = _NoBatchNorm(), optax.adamw(1e-2, weight_decay=0.05)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.standard_normal((16, 8, 8, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
    }
    results = {}
    for k in (1, 4):
        step = jax.jit(
            functools.partial(
                steps.train_step,
                model=model,
                tx=tx,
                schedule=lambda s: 1e-2,
                mix_fn=_identity_mix,
                ema_decay=0.0,
                grad_accum_steps=k,
            )
        )
        state = init_train_state(0, model=model, tx=tx, input_shape=(1, 8, 8, 3), use_ema=False)
        state_losses = []
        for _ in range(3):
            state, metrics = step(state, batch)
            state_losses.append(float(metrics.compute()["loss"]))
        results[k] = (state_losses, jax.device_get(state.params))
    (losses_1, params_1), (losses_4, params_4) = results[1], results[4]
    np.testing.assert_allclose(losses_4, losses_1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), params_4, params_1)


def _micro(**overrides):
    config = train_testlib.micro_config(**overrides)
    return from_config.model_from_config(config, 10), config


def _small_variables(model) -> dict:
    """Random weights scaled down (finite activations), positive running variances, dtypes kept."""
    variables = train_testlib.random_variables(model)
    return {
        "params": jax.tree.map(lambda x: (0.1 * x).astype(x.dtype), variables["params"]),
        "batch_stats": jax.tree.map(lambda x: np.abs(x).astype(x.dtype), variables["batch_stats"]),
    }


def test_bf16_compute_keeps_float32_state_and_logits():
    model_32, _ = _micro()
    model_16, config = _micro(compute_dtype="bfloat16")
    assert model_16.dtype == jnp.bfloat16
    variables = _small_variables(model_32)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
    logits_32 = jax.jit(model_32.apply)(variables, x)  # jitted: eager ops would compile one program each
    logits_16, updates = jax.jit(lambda v, x: model_16.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert logits_16.dtype == jnp.float32
    leaves = jax.tree_util.tree_leaves_with_path(updates)
    not_32 = {jax.tree_util.keystr(p): str(v.dtype) for p, v in leaves if v.dtype not in (np.float32, np.int32)}
    assert not not_32, not_32  # BatchNorm statistics stay float32 under bf16 compute
    logits_16_eval = jax.jit(model_16.apply)(variables, x)
    rel = float(jnp.linalg.norm(logits_16_eval - logits_32) / jnp.linalg.norm(logits_32))
    assert 0 < rel < 0.05, rel  # bf16 really used (not 0), and close

    run = train_lib.setup(config, tasks.get(config), devices=jax.devices()[:1])
    dtypes = {x.dtype for x in jax.tree.leaves((run.abstract.params, run.abstract.opt_state, run.abstract.batch_stats))}
    assert dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}, dtypes


def test_remat_stages_give_the_same_gradients_and_weights_layout():
    model, _ = _micro()
    remat, _ = _micro(remat_stages=(0, 1, 2, 3))
    assert remat.use_checkpoint_stages == (0, 1, 2, 3)
    variables = _small_variables(model)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)

    def grads(m):
        def loss(params):
            logits, _ = m.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(logits**2)

        return jax.jit(jax.grad(loss))(variables["params"])

    g, g_remat = grads(model), grads(remat)
    assert jax.tree.structure(g) == jax.tree.structure(g_remat)  # same names: checkpoints interchange
    # Recomputation changes float32 rounding only. The gradients of the conv biases that feed
    # BatchNorm are analytically zero (pure ~1e-6 rounding noise), so the absolute tolerance is
    # relative to the largest gradient rather than to each array.
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(g))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale), g_remat, g)


def test_bad_compute_dtype_fails_clearly():
    with pytest.raises(ValueError, match="compute_dtype='float8'"):
        _micro(compute_dtype="float8")
