"""Pallas kernels for routed attention (`routed_attention(impl='pallas')`).

The gather never happens: each kernel instance owns one (image, query region, head) and
reads the key/value blocks of its routed regions straight from K/V by routing index, with
an online softmax (FlashAttention-style running max / normaliser / output) over them.

Two launch styles, one set of block updates (`pallas_blocks`: `fwd_update`, `dq_update`, `dkv_update`):

- 'tpu': the routing indices (and weights) are scalar-prefetched (`PrefetchScalarGridSpec`)
  and drive the BlockSpec index maps, so the pipeline DMAs exactly the routed K/V blocks;
  the routed regions are the innermost ("arbitrary") grid axis, the accumulators live in
  VMEM scratch. Tested on CPU in TPU interpret mode (`pltpu.InterpretParams`).
- 'gpu': (Triton-style) one program per (image, query region, head) loops over its routed
  regions and loads each K/V block with a dynamic index. Tested in Pallas interpret mode.
  Triton needs power-of-two block sides: region token counts and head widths (BiFormer at
  224: 64/16/4 tokens, 32 wide) qualify; other shapes raise a clear error.

Backward (custom VJP, residuals q, k, v, output and log-sum-exp; nothing topk-fold):
a dq kernel on the same grid as the forward (also giving the routing-weight gradient),
and a dk/dv kernel over *key* regions that visits the query regions routed to each one,
from an inverse routing table built with one argsort (`inverse_routing`).

Not compiled for real GPU/TPU hardware in this repository's CI (CPU only): the interpret-
mode tests check the numerics and the indexing, not Mosaic/Triton lowering or speed.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from biformer_jax.ops.heads import merge_heads, split_qkv_heads
from biformer_jax.ops.pallas_blocks import dkv_update, dq_update, fwd_update

VARIANTS = ("tpu", "gpu")


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


def pallas_routed_attention(
    q: jax.Array,
    kv: jax.Array,
    r_idx: jax.Array,
    r_weight: Optional[jax.Array],
    *,
    num_heads: int,
    scale: float,
    interpret: bool = False,
    variant: Optional[str] = None,
) -> jax.Array:
    """Same contract as `routed_attention`.

    variant: 'tpu' or 'gpu' (default: the current backend's; 'gpu' in interpret mode).
    interpret: run in Pallas interpret mode (CPU tests): TPU interpret mode for 'tpu'.
    """
    if variant is None:
        backend = jax.default_backend()
        if interpret:
            variant = "gpu"
        elif backend in ("tpu", "gpu"):
            variant = backend
        else:
            raise ValueError(
                f"attn_impl='pallas' needs a GPU or TPU backend (this one is {backend!r}); on CPU use "
                "'pallas_interpret' (slow, for tests) or 'chunked'/'gather'/'auto'."
            )
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}.")
    qh, kh, vh = split_qkv_heads(q, kv, num_heads, scale)  # (N, P, m, Tq, d), (N, P, m, Tkv, d|dv)
    if variant == "gpu":
        _check_gpu_shapes(qh, kh, vh)
    soft = r_weight is not None
    w = r_weight.astype(jnp.float32) if soft else jnp.ones(r_idx.shape, jnp.float32)
    out = _attend(qh, kh, vh, r_idx.astype(jnp.int32), w, variant, interpret, soft)  # (N, P, m, Tq, dv)
    return merge_heads(out).astype(q.dtype)  # (N, P, Tq, Cv)


def _check_gpu_shapes(qh, kh, vh):
    sides = {"query tokens per region": qh.shape[3], "key tokens per region": kh.shape[3]}
    sides.update({"qk head width": qh.shape[4], "v head width": vh.shape[4]})
    bad = {k: v for k, v in sides.items() if v & (v - 1)}
    if bad:
        raise ValueError(
            f"the GPU (Triton) routed-attention kernel needs power-of-two block sides, got {bad}; "
            "use attn_impl='chunked' or 'gather' for this configuration."
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attend(qh, kh, vh, r_idx, w, variant, interpret, soft):
    return _forward(qh, kh, vh, r_idx, w, variant, interpret)[0]


def _attend_fwd(qh, kh, vh, r_idx, w, variant, interpret, soft):
    out, lse = _forward(qh, kh, vh, r_idx, w, variant, interpret)
    return out, (qh, kh, vh, r_idx, w, out, lse)


def _attend_bwd(variant, interpret, soft, res, dout):
    qh, kh, vh, r_idx, w, out, lse = res
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # (N,P,m,Tq,1)
    dout = dout.astype(vh.dtype)
    launch = _tpu_backward if variant == "tpu" else _gpu_backward
    dq, dk, dv, dw = launch(qh, kh, vh, r_idx, w, lse, dout, delta, interpret)
    dw = jnp.sum(dw, axis=2) if soft else jnp.zeros_like(w)  # (N, P, m, K) -> (N, P, K)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, dw


_attend.defvjp(_attend_fwd, _attend_bwd)


def _forward(qh, kh, vh, r_idx, w, variant, interpret):
    launch = _tpu_forward if variant == "tpu" else _gpu_forward
    return launch(qh, kh, vh, r_idx, w, interpret)


def _tpu_interpret(interpret: bool):
    return pltpu.InterpretParams() if interpret else False


# --- TPU: scalar-prefetched routing drives the index maps --------------------------------


def _tpu_own_block(b, r, h, j, *_):
    """Index map over grid (N, P, m, topk) with the prefetched routing: the query's own block."""
    return (b, r, h, 0, 0)


def _tpu_routed_block(b, r, h, j, idx, *_):
    """Index map: the j-th routed K/V block of query region r (idx = prefetched r_idx)."""
    return (b, idx[b, r, j], h, 0, 0)


def _tpu_forward(qh, kh, vh, r_idx, w, interpret):
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


def _tpu_backward(qh, kh, vh, r_idx, w, lse, dout, delta, interpret):
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


# --- GPU (Triton style): one program per (image, region, head), loop with dynamic loads ---


def _whole(x):
    """A BlockSpec handing the kernel the whole array (indexed inside with dynamic indices)."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _gpu_forward(qh, kh, vh, r_idx, w, interpret):
    n, p, m, tq, d = qh.shape
    dv = vh.shape[4]
    topk = r_idx.shape[-1]

    def kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        b, r, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        q = q_ref[...]

        def body(j, carry):
            src = idx_ref[b, r, j]
            return fwd_update(q, k_ref[b, src, h], v_ref[b, src, h], w_ref[b, r, j], *carry)

        init = (
            jnp.full((tq, 1), -jnp.inf, jnp.float32),
            jnp.zeros((tq, 1), jnp.float32),
            jnp.zeros((tq, dv), jnp.float32),
        )
        mx, l, acc = jax.lax.fori_loop(0, topk, body, init)
        o_ref[...] = (acc / l).astype(o_ref.dtype)
        lse_ref[...] = mx + jnp.log(l)

    own = lambda b, r, h: (b, r, h, 0, 0)  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(n, p, m),
        in_specs=[_whole(r_idx), _whole(w), pl.BlockSpec((None, None, None, tq, d), own), _whole(kh), _whole(vh)],
        out_specs=[pl.BlockSpec((None, None, None, tq, dv), own), pl.BlockSpec((None, None, None, tq, 1), own)],
        out_shape=[
            jax.ShapeDtypeStruct((n, p, m, tq, dv), vh.dtype),
            jax.ShapeDtypeStruct((n, p, m, tq, 1), jnp.float32),
        ],
        interpret=interpret,
    )(r_idx, w, qh, kh, vh)


def _gpu_backward(qh, kh, vh, r_idx, w, lse, dout, delta, interpret):
    n, p, m, tq, d = qh.shape
    tkv, dv = kh.shape[3], vh.shape[4]
    topk = r_idx.shape[-1]
    own = lambda b, r, h: (b, r, h, 0, 0)  # noqa: E731

    def dq_kernel(idx_ref, w_ref, q_ref, k_ref, v_ref, lse_ref, do_ref, dl_ref, dq_ref, dw_ref):
        b, r, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        q, lse, do, delta = q_ref[...], lse_ref[...], do_ref[...], dl_ref[...]
        slot = jax.lax.broadcasted_iota(jnp.int32, (1, topk), 1)

        def body(j, carry):
            dq, dws = carry
            src = idx_ref[b, r, j]
            dq, dw = dq_update(q, k_ref[b, src, h], v_ref[b, src, h], w_ref[b, r, j], lse, do, delta, dq)
            return dq, jnp.where(slot == j, dw, dws)

        dq, dws = jax.lax.fori_loop(0, topk, body, (jnp.zeros((tq, d), jnp.float32), jnp.zeros((1, topk), jnp.float32)))
        dq_ref[...] = dq
        dw_ref[...] = dws

    dq, dw = pl.pallas_call(
        dq_kernel,
        grid=(n, p, m),
        in_specs=[
            _whole(r_idx),
            _whole(w),
            pl.BlockSpec((None, None, None, tq, d), own),
            _whole(kh),
            _whole(vh),
            pl.BlockSpec((None, None, None, tq, 1), own),
            pl.BlockSpec((None, None, None, tq, dv), own),
            pl.BlockSpec((None, None, None, tq, 1), own),
        ],
        out_specs=[pl.BlockSpec((None, None, None, tq, d), own), pl.BlockSpec((None, None, None, 1, topk), own)],
        out_shape=[
            jax.ShapeDtypeStruct(qh.shape, jnp.float32),
            jax.ShapeDtypeStruct((n, p, m, 1, topk), jnp.float32),
        ],
        interpret=interpret,
    )(r_idx, w, qh, kh, vh, lse, dout, delta)

    inv_q, inv_k, count = inverse_routing(r_idx)

    def dkv_kernel(iq_ref, ik_ref, c_ref, w_ref, k_ref, v_ref, q_ref, lse_ref, do_ref, dl_ref, dk_ref, dv_ref):
        b, r, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        k, v = k_ref[...], v_ref[...]

        def body(j, carry):
            src, slot = iq_ref[b, r, j], ik_ref[b, r, j]
            return dkv_update(
                q_ref[b, src, h],
                k,
                v,
                w_ref[b, src, slot],
                lse_ref[b, src, h],
                do_ref[b, src, h],
                dl_ref[b, src, h],
                *carry,
            )

        init = (jnp.zeros((tkv, d), jnp.float32), jnp.zeros((tkv, dv), jnp.float32))
        dk, dv_ = jax.lax.fori_loop(0, c_ref[b, r], body, init)
        dk_ref[...] = dk
        dv_ref[...] = dv_

    dk, dv = pl.pallas_call(
        dkv_kernel,
        grid=(n, p, m),  # (image, key region, head)
        in_specs=[
            _whole(inv_q),
            _whole(inv_k),
            _whole(count),
            _whole(w),
            pl.BlockSpec((None, None, None, tkv, d), own),
            pl.BlockSpec((None, None, None, tkv, dv), own),
            _whole(qh),
            _whole(lse),
            _whole(dout),
            _whole(delta),
        ],
        out_specs=[pl.BlockSpec((None, None, None, tkv, d), own), pl.BlockSpec((None, None, None, tkv, dv), own)],
        out_shape=[jax.ShapeDtypeStruct(kh.shape, jnp.float32), jax.ShapeDtypeStruct(vh.shape, jnp.float32)],
        interpret=interpret,
    )(inv_q, inv_k, count, w, kh, vh, qh, lse, dout, delta)
    return dq, dk, dv, dw[:, :, :, 0, :]
