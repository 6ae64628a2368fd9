"""Routed attention as Pallas Mosaic GPU kernels (Hopper: TMA copies, wgmma, online softmax).

The 'cuda' branch of `routed_attention(impl='pallas')`. Every kernel instance owns one
64-row tile of one (image, region, head) and walks a list of 64-row tiles of the other
side, fetched by routing index with TMA into a two-slot shared-memory ring (the copy of
step s+2 is issued as soon as step s has consumed its slot, so one copy is always in
flight behind the matmuls):

- forward: a query tile visits the K/V tiles of its routed regions (topk x Tkv/64 steps),
  online softmax in registers, output and log-sum-exp written once;
- dq: the same walk recomputing the probabilities, dq (and the per-row routing-weight
  gradient for soft routing) accumulated in registers;
- dk/dv: a K/V tile visits the query tiles of the regions routed to its region (from the
  inverse routing table, a dynamic count), in the transposed form s^T = K Q^T so that
  dV += P^T dO and dK += dS^T Q need no transpose of a register array.

Blocks are 64 x 64 (one warpgroup's wgmma M): region token counts that are not multiples
of 64 are zero-padded in HBM (BiFormer-S at 224: 64/16/4 tokens per region, 49 query
tokens; segmentation at 512: 256/64/16) and the padded keys are masked to -inf in the
forward. Zero-padded keys and values contribute exactly nothing to the backward (their
K/V rows are 0), and padded query rows have dO = 0, so the backward needs no mask.
Shared memory per instance (bf16, head width 32): Q and O tiles 8 KiB, two K and two V
slots 16 KiB, far under the 227 KiB of an H100/H200. Padding costs compute when regions
are small (16 tokens: 4x per side): `routed_attention`'s 'auto' only picks this kernel
where the waste is small (`AUTO_KERNEL_MAX_PAD_WASTE`).

wgmma takes 16-bit operands from registers: float32 inputs are cast to bfloat16 for the
matmuls (float32 accumulation and softmax), the precision XLA's default float32 matmul
gets on these GPUs is TF32, so float32 models see slightly coarser attention here. (The
interpreter keeps float32 operands, so interpret-mode tests compare at float32 precision.)

`interpret=True` runs the kernels in the Mosaic GPU interpreter (CPU tests). Its wgmma
accepts neither register operands nor transposed refs, so there each matmul is a
`lax.dot_general` of the same operands; everything else (TMA ring, barriers, indexing,
padding, masking, softmax) is the code that lowers for the GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from biformer_jax.ops.pallas_gpu_utils import BLOCK, Ops, launch, row, smem

WIDTH = 16  # head widths are padded to a multiple of this (the bf16 wgmma K step)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """(N, P, m, T, c) -> (N, P, m, rows, c'), zero rows appended and the head width c
    rounded up to a multiple of WIDTH (zero columns change no dot product)."""
    cols = -(-x.shape[4] // WIDTH) * WIDTH
    return jnp.pad(x, ((0, 0),) * 3 + ((0, rows - x.shape[3]), (0, cols - x.shape[4])))


def _padded(t: int) -> int:
    return -(-t // BLOCK) * BLOCK


def compute_dtype(dtype, interpret: bool = False) -> jnp.dtype:
    """The matmul operand dtype: wgmma register operands are 16-bit, so float32 becomes
    bfloat16 on the GPU; the interpreter keeps float32 (tests compare tightly)."""
    if jnp.dtype(dtype) == jnp.float32 and not interpret:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(dtype)


# --- forward ------------------------------------------------------------------------------


# Each kernel is a jitted function: a model calls it with the same shapes in every block of
# a stage, and JAX lowers a jitted callee once per signature (Mosaic GPU lowering takes
# about 0.5 s per kernel; BiFormer-T's training step holds 36 kernel calls).
@functools.partial(jax.jit, static_argnames=("tkv", "interpret"))
def forward(qh, kh, vh, r_idx, w, tkv: int, interpret: bool):
    """qh (N, P, m, TQ, d), kh/vh (N, P, m, TK, d/dv) padded to BLOCK multiples, compute
    dtype; r_idx (N, P, K) int32; w (N, P, K) float32; tkv the unpadded key count.
    Returns out (N, P, m, TQ, dv) float32 and lse (N, P, m, TQ) float32."""
    n, p, m, tq, d = qh.shape
    tk, dv = kh.shape[3], vh.shape[4]
    topk = r_idx.shape[-1]
    nk = tk // BLOCK
    steps = topk * nk
    dt = qh.dtype
    ops = Ops(interpret)
    wg, red = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)

    def body(ids, idx_ref, w_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, q_s, o_s, k_s, v_s, lse_s, q_bar, k_bar, v_bar):
        b, r, h, qt = ids()
        rows = pl.ds(qt * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(q_ref.at[b, r, h, rows], q_s, q_bar.at[0])

        def issue(s, slot):
            j, t = lax.div(s, nk), lax.rem(s, nk)
            src = idx_ref[b, r, j]
            tile = pl.ds(t * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(k_ref.at[b, src, h, tile], k_s.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, src, h, tile], v_s.at[slot], v_bar.at[slot])

        for s in range(min(2, steps)):
            issue(s, s)
        plgpu.barrier_wait(q_bar.at[0])

        def step(s, carry):
            acc, m_i, l_i = carry
            slot = lax.rem(s, 2)
            j, t = lax.div(s, nk), lax.rem(s, nk)
            wj = w_ref[b, r, j]
            plgpu.barrier_wait(k_bar.at[slot])
            sc = ops.mm_nt(q_s, k_s.at[slot]) * wj  # (BLOCK q, BLOCK kv)
            if tkv % BLOCK:
                sc = jnp.where(ops.col_iota(sc.shape) + t * BLOCK < tkv, sc, -jnp.inf)
            m_new = jnp.maximum(m_i, sc.max(axis=1))
            alpha = jnp.exp(m_i - m_new)
            pr = jnp.exp(sc - row(m_new, sc.shape, 1))
            l_i = l_i * alpha + pr.sum(axis=1)
            plgpu.barrier_wait(v_bar.at[slot])
            acc = acc * row(alpha, acc.shape, 1) + ops.mm_nn((pr * wj).astype(dt), v_s.at[slot])

            @pl.when(s + 2 < steps)
            def _():
                issue(s + 2, slot)

            return acc, m_new, l_i

        init = (ops.zeros((BLOCK, dv), wg), ops.full((BLOCK,), -jnp.inf, red), ops.zeros((BLOCK,), red))
        acc, m_i, l_i = lax.fori_loop(0, steps, step, init)
        o_s[...] = acc / row(l_i, acc.shape, 1)
        lse_s[...] = m_i + jnp.log(l_i)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, r, h, rows])
        plgpu.copy_smem_to_gmem(lse_s, lse_ref.at[b, r, h, rows])
        plgpu.wait_smem_to_gmem(0)

    body.__name__ = "routed_attention_fwd"  # the kernel's name in profiles
    return launch(
        body,
        (r_idx, w, qh, kh, vh),
        [
            jax.ShapeDtypeStruct((n, p, m, tq, dv), jnp.float32),
            jax.ShapeDtypeStruct((n, p, m, tq), jnp.float32),
        ],
        [
            smem((BLOCK, d), dt),
            smem((BLOCK, dv), jnp.float32),
            smem((2, BLOCK, d), dt),
            smem((2, BLOCK, dv), dt),
            plgpu.SMEM((BLOCK,), jnp.float32),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
        ],
        (n, p, m, tq // BLOCK),
        interpret,
    )


# --- backward: dq (and the routing-weight gradient) ----------------------------------------


@functools.partial(jax.jit, static_argnames=("soft", "interpret"))
def backward_dq(qh, kh, vh, r_idx, w, lse, do, delta, soft: bool, interpret: bool):
    """Padded operands as in `forward`; lse/delta (N, P, m, TQ) float32, do (N, P, m, TQ, dv).

    Returns dq (N, P, m, TQ, d) float32 and, with soft routing, the per-row routing-weight
    gradients (N, P, m, TQ/BLOCK, K*TK/BLOCK, BLOCK) float32 (summed by the caller)."""
    n, p, m, tq, d = qh.shape
    tk, dv = kh.shape[3], vh.shape[4]
    topk = r_idx.shape[-1]
    nk = tk // BLOCK
    steps = topk * nk
    dt = qh.dtype
    ops = Ops(interpret)
    wg, red = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)

    def body(ids, idx_ref, w_ref, q_ref, k_ref, v_ref, lse_ref, do_ref, dl_ref, *rest):
        if soft:
            dq_ref, dw_ref, q_s, do_s, k_s, v_s, dq_s, dw_s, q_bar, k_bar, v_bar = rest
        else:
            dq_ref, q_s, do_s, k_s, v_s, dq_s, q_bar, k_bar, v_bar = rest
        b, r, h, qt = ids()
        rows = pl.ds(qt * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(q_ref.at[b, r, h, rows], q_s, q_bar.at[0])
        plgpu.copy_gmem_to_smem(do_ref.at[b, r, h, rows], do_s, q_bar.at[1])

        def issue(s, slot):
            j, t = lax.div(s, nk), lax.rem(s, nk)
            src = idx_ref[b, r, j]
            tile = pl.ds(t * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(k_ref.at[b, src, h, tile], k_s.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, src, h, tile], v_s.at[slot], v_bar.at[slot])

        for s in range(min(2, steps)):
            issue(s, s)
        lse = ops.vload(lse_ref.at[b, r, h], qt * BLOCK, red)
        delta = ops.vload(dl_ref.at[b, r, h], qt * BLOCK, red)
        plgpu.barrier_wait(q_bar.at[0])
        plgpu.barrier_wait(q_bar.at[1])

        def step(s, dq):
            slot = lax.rem(s, 2)
            j = lax.div(s, nk)
            wj = w_ref[b, r, j]
            plgpu.barrier_wait(k_bar.at[slot])
            s_raw = ops.mm_nt(q_s, k_s.at[slot])  # (BLOCK q, BLOCK kv)
            pr = jnp.exp(s_raw * wj - row(lse, s_raw.shape, 1))
            plgpu.barrier_wait(v_bar.at[slot])
            dpv = ops.mm_nt(do_s, v_s.at[slot])  # d loss / d (p * w)
            ds = pr * (dpv * wj - row(delta, s_raw.shape, 1))  # d loss / d (w * s_raw)
            if soft:  # w scales the logits and the values of its region
                dw_s[s] = (ds * s_raw + pr * dpv).sum(axis=1)
            dq = dq + ops.mm_nn((ds * wj).astype(dt), k_s.at[slot])

            @pl.when(s + 2 < steps)
            def _():
                issue(s + 2, slot)

            return dq

        dq_s[...] = lax.fori_loop(0, steps, step, ops.zeros((BLOCK, d), wg))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dq_s, dq_ref.at[b, r, h, rows])
        if soft:
            plgpu.copy_smem_to_gmem(dw_s, dw_ref.at[b, r, h, qt])
        plgpu.wait_smem_to_gmem(0)

    out_type = [jax.ShapeDtypeStruct((n, p, m, tq, d), jnp.float32)]
    scratch = [smem((BLOCK, d), dt), smem((BLOCK, dv), dt), smem((2, BLOCK, d), dt), smem((2, BLOCK, dv), dt)]
    scratch.append(smem((BLOCK, d), jnp.float32))
    if soft:
        out_type.append(jax.ShapeDtypeStruct((n, p, m, tq // BLOCK, steps, BLOCK), jnp.float32))
        scratch.append(plgpu.SMEM((steps, BLOCK), jnp.float32))
    scratch += [plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2)]
    body.__name__ = "routed_attention_dq"
    inputs = (r_idx, w, qh, kh, vh, lse, do, delta)
    outs = launch(body, inputs, out_type, scratch, (n, p, m, tq // BLOCK), interpret)
    return outs if soft else (outs[0], None)


# --- backward: dk, dv over key tiles ---------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("interpret",))
def backward_dkv(qh, kh, vh, inv_q, inv_k, count, w, lse, do, delta, interpret: bool):
    """dk (N, P, m, TK, d), dv (N, P, m, TK, dv) float32 from the inverse routing
    (`pallas_routed_attention.inverse_routing`): key region r is visited by the query
    regions inv_q[n, r, :count[n, r]], routed to it through their slot inv_k."""
    n, p, m, tq, d = qh.shape
    tk, dv = kh.shape[3], vh.shape[4]
    nq = tq // BLOCK
    dt = qh.dtype
    ops = Ops(interpret)
    wg, red = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(0)

    def body(ids, iq_ref, ik_ref, c_ref, w_ref, q_ref, k_ref, v_ref, lse_ref, do_ref, dl_ref, *rest):
        dk_ref, dv_ref, k_s, v_s, q_s, do_s, dk_s, dv_s, kv_bar, q_bar, do_bar = rest
        b, r, h, kt = ids()
        rows = pl.ds(kt * BLOCK, BLOCK)
        plgpu.copy_gmem_to_smem(k_ref.at[b, r, h, rows], k_s, kv_bar.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[b, r, h, rows], v_s, kv_bar.at[1])
        steps = c_ref[b, r] * nq

        def source(s):
            j, t = lax.div(s, nq), lax.rem(s, nq)
            return iq_ref[b, r, j], ik_ref[b, r, j], t

        def issue(s, slot):
            src, _, t = source(s)
            tile = pl.ds(t * BLOCK, BLOCK)
            plgpu.copy_gmem_to_smem(q_ref.at[b, src, h, tile], q_s.at[slot], q_bar.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[b, src, h, tile], do_s.at[slot], do_bar.at[slot])

        for s in range(2):
            pl.when(s < steps)(functools.partial(issue, s, s))

        plgpu.barrier_wait(kv_bar.at[0])
        plgpu.barrier_wait(kv_bar.at[1])

        def step(s, carry):
            dk, dv_acc = carry
            slot = lax.rem(s, 2)
            src, k_slot, t = source(s)
            wj = w_ref[b, src, k_slot]
            lse = ops.vload(lse_ref.at[b, src, h], t * BLOCK, red)
            delta = ops.vload(dl_ref.at[b, src, h], t * BLOCK, red)
            plgpu.barrier_wait(q_bar.at[slot])
            s_t = ops.mm_nt(k_s, q_s.at[slot])  # (BLOCK kv, BLOCK q): raw logits, transposed
            p_t = jnp.exp(s_t * wj - row(lse, s_t.shape, 0))
            plgpu.barrier_wait(do_bar.at[slot])
            dv_acc = dv_acc + ops.mm_nn((p_t * wj).astype(dt), do_s.at[slot])
            dp_t = ops.mm_nt(v_s, do_s.at[slot])  # (BLOCK kv, BLOCK q)
            ds_t = p_t * (dp_t * wj - row(delta, s_t.shape, 0))
            dk = dk + ops.mm_nn((ds_t * wj).astype(dt), q_s.at[slot])

            @pl.when(s + 2 < steps)
            def _():
                issue(s + 2, slot)

            return dk, dv_acc

        dk, dv_acc = lax.fori_loop(0, steps, step, (ops.zeros((BLOCK, d), wg), ops.zeros((BLOCK, dv), wg)))
        dk_s[...] = dk
        dv_s[...] = dv_acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dk_s, dk_ref.at[b, r, h, rows])
        plgpu.copy_smem_to_gmem(dv_s, dv_ref.at[b, r, h, rows])
        plgpu.wait_smem_to_gmem(0)

    body.__name__ = "routed_attention_dkv"
    return launch(
        body,
        (inv_q, inv_k, count, w, qh, kh, vh, lse, do, delta),
        [
            jax.ShapeDtypeStruct((n, p, m, tk, d), jnp.float32),
            jax.ShapeDtypeStruct((n, p, m, tk, dv), jnp.float32),
        ],
        [
            smem((BLOCK, d), dt),
            smem((BLOCK, dv), dt),
            smem((2, BLOCK, d), dt),
            smem((2, BLOCK, dv), dt),
            smem((BLOCK, d), jnp.float32),
            smem((BLOCK, dv), jnp.float32),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
        ],
        (n, p, m, tk // BLOCK),
        interpret,
    )


# --- the whole op on unpadded heads-major operands -------------------------------------------


def attend_forward(qh, kh, vh, r_idx, w, interpret: bool = False):
    """Unpadded qh (N, P, m, Tq, d) pre-scaled, kh/vh (N, P, m, Tkv, d/dv) -> out
    (N, P, m, Tq, dv) float32 and lse (N, P, m, Tq) float32."""
    tq, tkv = qh.shape[3], kh.shape[3]
    cdt = compute_dtype(qh.dtype, interpret)
    qp = _pad_rows(qh.astype(cdt), _padded(tq))  # (N, P, m, TQ, d)
    kp = _pad_rows(kh.astype(cdt), _padded(tkv))  # (N, P, m, TK, d)
    vp = _pad_rows(vh.astype(cdt), _padded(tkv))  # (N, P, m, TK, dv)
    out, lse = forward(qp, kp, vp, r_idx, w, tkv, interpret)
    return out[:, :, :, :tq, : vh.shape[4]], lse[:, :, :, :tq]


def attend_backward(qh, kh, vh, r_idx, w, lse, dout, delta, soft: bool, inverse, interpret: bool = False):
    """Gradients dq, dk, dv (float32, unpadded) and dw (N, P, K) float32 (zeros if not soft).

    lse, delta: (N, P, m, Tq) float32; dout (N, P, m, Tq, dv); inverse = (inv_q, inv_k, count)."""
    n, p, m, tq, d = qh.shape
    tkv, topk, dv_width = kh.shape[3], r_idx.shape[-1], vh.shape[4]
    tqp, tkp = _padded(tq), _padded(tkv)
    cdt = compute_dtype(qh.dtype, interpret)
    qp = _pad_rows(qh.astype(cdt), tqp)  # (N, P, m, TQ, d)
    kp = _pad_rows(kh.astype(cdt), tkp)  # (N, P, m, TK, d)
    vp = _pad_rows(vh.astype(cdt), tkp)  # (N, P, m, TK, dv)
    dop = _pad_rows(dout.astype(cdt), tqp)  # (N, P, m, TQ, dv)
    pad = ((0, 0),) * 3 + ((0, tqp - tq),)
    lse_p, delta_p = jnp.pad(lse, pad), jnp.pad(delta, pad)  # (N, P, m, TQ)
    dq, dw_rows = backward_dq(qp, kp, vp, r_idx, w, lse_p, dop, delta_p, soft, interpret)
    dk, dv = backward_dkv(qp, kp, vp, *inverse, w, lse_p, dop, delta_p, interpret)
    if soft:
        dw = dw_rows.reshape(n, p, m, tqp // BLOCK, topk, tkp // BLOCK, BLOCK)  # (N, P, m, TQ/B, K, TK/B, B)
        dw = dw.sum(axis=(2, 3, 5, 6))  # (N, P, K)
    else:
        dw = jnp.zeros(w.shape, jnp.float32)
    return dq[:, :, :, :tq, :d], dk[:, :, :, :tkv, :d], dv[:, :, :, :tkv, :dv_width], dw


@functools.cache
def smem_bytes(d: int, dv: int, dtype) -> dict:
    """Shared memory per kernel instance (bytes), for the docs and a test."""
    c = jnp.dtype(compute_dtype(dtype)).itemsize
    tile = BLOCK * c
    return {
        "forward": tile * (d + 2 * d + 2 * dv) + BLOCK * dv * 4 + BLOCK * 4,
        "dq": tile * (d + dv + 2 * d + 2 * dv) + BLOCK * d * 4,
        "dkv": tile * (d + dv + 2 * d + 2 * dv) + BLOCK * (d + dv) * 4,
    }
