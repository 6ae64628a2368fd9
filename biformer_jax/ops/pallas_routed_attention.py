"""Pallas Mosaic TPU kernels for routed attention (the 'tpu' branch of `impl='pallas'`).

The gather never happens: each kernel instance owns one (image, query region, head) and
reads the key/value blocks of its routed regions straight from K/V by routing index, with
an online softmax (FlashAttention-style running max / normaliser / output) over them
(block updates in `pallas_blocks`: `fwd_update`, `dq_update`, `dkv_update`).
The routing indices (and weights) are scalar-prefetched (`PrefetchScalarGridSpec`) and
drive the BlockSpec index maps, so the pipeline DMAs exactly the routed K/V blocks; the
routed regions are the innermost ("arbitrary") grid axis, the accumulators live in VMEM
scratch. Blocks are whole regions (a block side equal to the array's is always allowed),
so odd token counts (49 queries, 4 keys) need no padding.

Backward (residuals q, k, v, output and log-sum-exp; nothing topk-fold): a dq kernel on
the same grid as the forward (also giving the routing-weight gradient), and a dk/dv
kernel over *key* regions that visits the query regions routed to each one, from an
inverse routing table built with one argsort (`inverse_routing`, shared with the GPU
kernels in `pallas_gpu_routed_attention`). The custom VJP and the choice of platform
live in `pallas_dispatch`.

CI checks the numerics in TPU interpret mode (`pltpu.InterpretParams`) and that whole
models lower for 'tpu' (`jax.export`); no TPU compiles or times them there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from biformer_jax.ops.pallas_blocks import dkv_update, dq_update, fwd_update


def inverse_routing(r_idx: jax.Array):
    """For each key region, the query regions routed to it.

    r_idx: (N, P, K) -> inv_q, inv_k: (N, P, P) int32 (query region and its routing slot,
    the j-th of those routed to key region p'; entries past the count repeat the last one,
    so a pipelined kernel fetches nothing new for them) and count: (N, P) int32.
    """
    n, p, k = r_idx.shape
    flat = r_idx.reshape(n, p * k).astype(jnp.int32)  # (N, P*K): key region of each (p, slot)
    order = jnp.argsort(flat, axis=-1, stable=True).astype(jnp.int32)  # (N, P*K) grouped by key region
    count = jnp.zeros((n, p), jnp.int32).at[jnp.arange(n)[:, None], flat].add(1)  # (N, P)
    start = jnp.cumsum(count, axis=-1) - count  # (N, P)
    j = jnp.arange(p, dtype=jnp.int32)
    pos = start[:, :, None] + jnp.minimum(j[None, None, :], jnp.maximum(count - 1, 0)[:, :, None])  # (N, P, P)
    pos = jnp.minimum(pos, p * k - 1)
    src = jnp.take_along_axis(order, pos.reshape(n, p * p), axis=-1).reshape(n, p, p)  # (N, P, P)
    return src // k, src % k, count


def _tpu_interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


# --- TPU: scalar-prefetched routing drives the index maps --------------------------------


def _tpu_own_block(b, r, h, j, *_):
    """Index map over grid (N, P, m, topk) with the prefetched routing: the query's own block."""
    return (b, r, h, 0, 0)


def _tpu_routed_block(b, r, h, j, idx, *_):
    """Index map: the j-th routed K/V block of query region r (idx = prefetched r_idx)."""
    return (b, idx[b, r, j], h, 0, 0)


@functools.partial(jax.jit, static_argnames=("interpret",))  # lowered once per shape
def tpu_forward(qh, kh, vh, r_idx, w, interpret):
    n, p, m, tq, d = qh.shape
    tkv, dv = kh.shape[3], vh.shape[4]
    topk = r_idx.shape[-1]

    def kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc):
        b, r, j = pl.program_id(0), pl.program_id(1), pl.program_id(3)

        @pl.when(j == 0)
        def _():
            m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
            l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
            acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

        m_sc[...], l_sc[...], acc_sc[...] = fwd_update(
            q_ref[...], k_ref[...], v_ref[...], w_ref[b, r, j], m_sc[...], l_sc[...], acc_sc[...]
        )

        @pl.when(j == topk - 1)
        def _():
            o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
            lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])

    own, routed = _tpu_own_block, _tpu_routed_block
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n, p, m, topk),
        in_specs=[
            pl.BlockSpec((None, None, None, tq, d), own),
            pl.BlockSpec((None, None, None, tkv, d), routed),
            pl.BlockSpec((None, None, None, tkv, dv), routed),
        ],
        out_specs=[pl.BlockSpec((None, None, None, tq, dv), own), pl.BlockSpec((None, None, None, tq, 1), own)],
        scratch_shapes=[
            pltpu.VMEM((tq, 1), jnp.float32),
            pltpu.VMEM((tq, 1), jnp.float32),
            pltpu.VMEM((tq, dv), jnp.float32),
        ],
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((n, p, m, tq, dv), vh.dtype),
            jax.ShapeDtypeStruct((n, p, m, tq, 1), jnp.float32),
        ],
        interpret=_tpu_interpret(interpret),
    )(r_idx, w, qh, kh, vh)


@functools.partial(jax.jit, static_argnames=("interpret",))
def tpu_backward(qh, kh, vh, r_idx, w, lse, dout, delta, interpret):
    n, p, m, tq, d = qh.shape
    tkv, dv = kh.shape[3], vh.shape[4]
    topk = r_idx.shape[-1]
    own, routed = _tpu_own_block, _tpu_routed_block

    def dq_kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, lse_ref, do_ref, dl_ref, dq_ref, dw_ref, dq_sc, dw_sc):
        b, r, j = pl.program_id(0), pl.program_id(1), pl.program_id(3)

        @pl.when(j == 0)
        def _():
            dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)
            dw_sc[...] = jnp.zeros(dw_sc.shape, jnp.float32)

        dq, dw = dq_update(
            q_ref[...], k_ref[...], v_ref[...], w_ref[b, r, j], lse_ref[...], do_ref[...], dl_ref[...], dq_sc[...]
        )
        dq_sc[...] = dq
        # A vector update (no store at a dynamic lane): slot j of the (1, K) row gets dw.
        slot = jax.lax.broadcasted_iota(jnp.int32, dw_sc.shape, 1)
        dw_sc[...] = jnp.where(slot == j, dw, dw_sc[...])

        @pl.when(j == topk - 1)
        def _():
            dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)
            dw_ref[...] = dw_sc[...]

    dq, dw = pl.pallas_call(
        dq_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(n, p, m, topk),
            in_specs=[
                pl.BlockSpec((None, None, None, tq, d), own),
                pl.BlockSpec((None, None, None, tkv, d), routed),
                pl.BlockSpec((None, None, None, tkv, dv), routed),
                pl.BlockSpec((None, None, None, tq, 1), own),
                pl.BlockSpec((None, None, None, tq, dv), own),
                pl.BlockSpec((None, None, None, tq, 1), own),
            ],
            out_specs=[pl.BlockSpec((None, None, None, tq, d), own), pl.BlockSpec((None, None, None, 1, topk), own)],
            scratch_shapes=[pltpu.VMEM((tq, d), jnp.float32), pltpu.VMEM((1, topk), jnp.float32)],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(qh.shape, jnp.float32),
            jax.ShapeDtypeStruct((n, p, m, 1, topk), jnp.float32),
        ],
        interpret=_tpu_interpret(interpret),
    )(r_idx, w, qh, kh, vh, lse, dout, delta)

    inv_q, inv_k, count = inverse_routing(r_idx)
    by_query = lambda b, r, h, j, iq, ik, c, w: (b, iq[b, r, j], h, 0, 0)  # noqa: E731

    def dkv_kernel(
        iq_ref, ik_ref, c_ref, w_ref, k_ref, v_ref, q_ref, lse_ref, do_ref, dl_ref, dk_ref, dv_ref, dk_sc, dv_sc
    ):
        b, r, j = pl.program_id(0), pl.program_id(1), pl.program_id(3)

        @pl.when(j == 0)
        def _():
            dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
            dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

        @pl.when(j < c_ref[b, r])
        def _():
            w = w_ref[b, iq_ref[b, r, j], ik_ref[b, r, j]]
            dk_sc[...], dv_sc[...] = dkv_update(
                q_ref[...], k_ref[...], v_ref[...], w, lse_ref[...], do_ref[...], dl_ref[...], dk_sc[...], dv_sc[...]
            )

        @pl.when(j == p - 1)
        def _():
            dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
            dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)

    dk, dv = pl.pallas_call(
        dkv_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(n, p, m, p),  # (image, key region, head, j-th query region routed to it)
            in_specs=[
                pl.BlockSpec((None, None, None, tkv, d), own),
                pl.BlockSpec((None, None, None, tkv, dv), own),
                pl.BlockSpec((None, None, None, tq, d), by_query),
                pl.BlockSpec((None, None, None, tq, 1), by_query),
                pl.BlockSpec((None, None, None, tq, dv), by_query),
                pl.BlockSpec((None, None, None, tq, 1), by_query),
            ],
            out_specs=[pl.BlockSpec((None, None, None, tkv, d), own), pl.BlockSpec((None, None, None, tkv, dv), own)],
            scratch_shapes=[pltpu.VMEM((tkv, d), jnp.float32), pltpu.VMEM((tkv, dv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kh.shape, jnp.float32), jax.ShapeDtypeStruct(vh.shape, jnp.float32)],
        interpret=_tpu_interpret(interpret),
    )(inv_q, inv_k, count, w, kh, vh, qh, lse, dout, delta)
    return dq, dk, dv, dw[:, :, :, 0, :]
