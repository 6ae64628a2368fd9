"""What every task's train step shares: top-level pure functions, dependencies passed as arguments.

`step_rngs` (the step's keys), `loss_and_grads` (a task's loss and gradients over the whole batch or
accumulated over micro-batches) and `apply_gradients` (AdamW, EMA, the finite guard). A task's
train step (tasks/<task>/steps.py) is built from them; `train_lib` binds it with functools.partial
and jits it over the mesh, the state donated. Nothing here reads a config or a global.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from biformer_jax.training import metrics as metrics_lib
from biformer_jax.training.train_state import TrainState, ema_update

# (params, batch_stats, inputs, rngs) -> (mean loss, updated batch_stats, grads) of one (micro-)batch.
LossAndGrads = Callable[[Any, Any, Any, dict[str, jax.Array]], tuple[jax.Array, Any, Any]]


def step_rngs(state: TrainState) -> dict[str, jax.Array]:
    """The step's random keys, a pure function of (base key, step): resumable bit for bit."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    mix, dropout, drop_path = jax.random.split(key, 3)
    return {"mix": mix, "dropout": dropout, "drop_path": drop_path}


def loss_and_grads(state: TrainState, inputs: Any, rngs: dict[str, jax.Array], *, fn: LossAndGrads, k: int = 1):
    """(loss, batch_stats, grads) of `fn` on `inputs` (a tree of arrays with the batch first).

    With k > 1: averaged over k micro-batches of B / k rows, summed in a lax.scan (activation
    memory of one micro-batch; BatchNorm state threaded, so each micro-batch is normalised with
    its own statistics and the running statistics update k times, as PyTorch does with
    accumulation). Micro-batch j draws its keys as fold_in(key, j).
    """
    if k == 1:
        return fn(state.params, state.batch_stats, inputs, rngs)
    batch = jax.tree.leaves(inputs)[0].shape[0]
    if batch % k:
        raise ValueError(f"grad_accum_steps={k} does not divide the batch of {batch}.")

    def split(x):
        # Micro-batch j is rows j, j + k, j + 2k, ...: every micro-batch stays spread over all the
        # devices that hold the batch (contiguous blocks of rows), so no data moves.
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)  # (k, B / k, ...)

    def body(carry, xs):
        batch_stats, loss_sum, grad_sum = carry
        j, micro_inputs = xs
        micro_rngs = {name: jax.random.fold_in(key, j) for name, key in rngs.items()}
        loss, batch_stats, grads = fn(state.params, batch_stats, micro_inputs, micro_rngs)
        return (batch_stats, loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    init = (state.batch_stats, jnp.zeros((), jnp.float32), zeros)
    (batch_stats, loss_sum, grad_sum), _ = jax.lax.scan(body, init, (jnp.arange(k), jax.tree.map(split, inputs)))
    grads = jax.tree.map(lambda g, p: (g / k).astype(p.dtype), grad_sum, state.params)
    return loss_sum / k, batch_stats, grads


def apply_gradients(
    state: TrainState,
    grads,
    loss: jax.Array,
    batch_stats,
    *,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    ema_decay: float,
) -> tuple[TrainState, metrics_lib.TrainMetrics]:
    """The update every task's train step ends with: AdamW (tx), the EMA, and the finite guard.

    A non-finite loss or gradient norm leaves the state untouched and is counted in the metrics.
    """
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    if state.has_ema:
        new = new.replace(
            ema_params=ema_update(state.ema_params, params, ema_decay),
            ema_batch_stats=ema_update(state.ema_batch_stats, batch_stats, ema_decay),
        )
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = metrics_lib.TrainMetrics.single_from_model_output(
        loss=loss,
        grad_norm=grad_norm,
        param_norm=optax.tree.norm(params),
        update_norm=optax.tree.norm(updates),
        learning_rate=schedule(state.step),
        nonfinite=(~finite).astype(jnp.float32),
    )
    return new, metrics
