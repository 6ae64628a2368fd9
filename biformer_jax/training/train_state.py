"""The training state and its model EMA (timm ModelEma semantics).

`TrainState` is one pytree: the step, the model's params and BatchNorm statistics, the optimiser
state, the EMA copies of params and statistics (empty dicts when EMA is off) and the base RNG key
(raw uint32 key data, so Orbax stores it as a plain array). For a model that scans its blocks, the
params, BatchNorm statistics, optimiser moments and EMA hold each stage's blocks stacked
(`models.block_layout`); checkpoints are written per block either way (`checkpoint`). Everything
random in a step is derived from (rng, step), which is what makes a resumed run bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from biformer_jax.models import block_layout


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 ()
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # {} without EMA
    ema_batch_stats: Any  # {} without EMA
    rng: jax.Array  # uint32 (2,): jax.random.key_data of the run's base key

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    @property
    def ema_variables(self) -> dict[str, Any]:
        return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}

    @property
    def has_ema(self) -> bool:
        return bool(jax.tree.leaves(self.ema_params))


def init_train_state(
    seed: int,
    *,
    model,
    tx: optax.GradientTransformation,
    input_shape: tuple[int, ...],
    use_ema: bool,
    variables: dict[str, Any] | None = None,
    stack_blocks: bool = False,
) -> TrainState:
    """A fresh state: the model initialised from `seed` (or `variables`, e.g. pretrained weights).

    `input_shape` is (N, H, W, C) of one example batch (only the shape matters). Pure, so it can
    be `jax.eval_shape`d for the abstract state and `jax.jit`ted with output shardings.
    `stack_blocks`: keep each stage's blocks stacked (`models.block_layout`; for a model that
    scans its blocks), params, optimiser moments and EMA alike.
    """
    key = jax.random.key(seed)
    if variables is None:
        variables = model.init({"params": jax.random.fold_in(key, 0)}, jnp.zeros(input_shape, jnp.float32))
    if stack_blocks:
        variables = block_layout.stack(variables)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (EMA starts as a copy, not an alias)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=copy(params) if use_ema else {},
        ema_batch_stats=copy(batch_stats) if use_ema else {},
        rng=jax.random.key_data(jax.random.fold_in(key, 1)),
    )


def ema_update(ema_tree: Any, new_tree: Any, decay: float) -> Any:
    """timm ModelEma: ema = decay * ema + (1 - decay) * new for every leaf, as its state_dict loop does.

    Float leaves (BatchNorm running statistics included) are averaged in float32. The integer
    `num_batches_tracked` is averaged too: timm multiplies the int64 tensor by the Python float
    decay (a float32 result), adds (1 - decay) * new, and `copy_` truncates toward zero into the
    integer, so the EMA counter stays 0 until (1 - decay) * steps reaches 1 and then lags the
    model's. Same arithmetic here, so an exported EMA state_dict holds the official counter.
    """
    d, rest = jnp.float32(decay), jnp.float32(1.0 - decay)  # Python computes 1 - decay in double

    def update(e, n):
        if not jnp.issubdtype(n.dtype, jnp.floating):
            # PyTorch rounds each product to float32 before the sum (separate kernels). The
            # maximum with 0 (counters are >= 0, so it changes nothing) keeps the compiler from
            # contracting product and sum into one fused multiply-add, which rounds once and can
            # move the truncated counter by 1 (decay 0.9: 7 instead of 6 at step 16).
            a, b = (jnp.maximum(p, 0.0) for p in (d * e.astype(jnp.float32), rest * n.astype(jnp.float32)))
            return jnp.trunc(a + b).astype(e.dtype)
        return (d * e.astype(jnp.float32) + rest * n.astype(jnp.float32)).astype(e.dtype)

    return jax.tree.map(update, ema_tree, new_tree)
