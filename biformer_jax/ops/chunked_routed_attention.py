"""Memory-efficient routed attention: online softmax over chunks of routed regions.

`routed_attention(impl='chunked')`. The official BRA gathers, for every query region, the
keys and values of its `topk` routed regions: a topk-fold copy of K/V for the whole map,
kept for the backward pass (with the attention probabilities). Here the routed regions
are visited `chunk` at a time in a loop; each step gathers only those regions, updates a
running max / normaliser / output (the online softmax of FlashAttention), and drops them.
A custom VJP keeps only q, kv, the routing, the output and the per-row log-sum-exp; its
backward loops over the same chunks, recomputing the probabilities, and scatter-adds the
key/value gradients into a K/V-sized accumulator. So neither pass holds more than
chunk / topk of the gathered K/V, and nothing topk-fold is stored between them.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from biformer_jax.ops.heads import gather_heads, merge_heads, split_heads, split_qkv_heads
from biformer_jax.ops.recompute import tie

# Regions per loop step: the largest divisor of topk not above topk // DEFAULT_CHUNK_DIVISOR
# (at least 1), so at most a quarter of the topk-fold gather is live at any time.
DEFAULT_CHUNK_DIVISOR = 4


def default_chunk(topk: int) -> int:
    target = max(1, topk // DEFAULT_CHUNK_DIVISOR)
    return max(d for d in range(1, target + 1) if topk % d == 0)


def chunked_routed_attention(
    q: jax.Array,
    kv: jax.Array,
    r_idx: jax.Array,
    r_weight: Optional[jax.Array],
    *,
    num_heads: int,
    scale: float,
    chunk: Optional[int] = None,
) -> jax.Array:
    """Same contract as `routed_attention`; `chunk` regions per step (must divide topk)."""
    k = r_idx.shape[-1]
    chunk = default_chunk(k) if chunk is None else chunk
    if chunk <= 0 or k % chunk:
        raise ValueError(f"chunk={chunk} must be a positive divisor of topk={k}.")
    return _attend(q, kv, r_idx, r_weight, num_heads, scale, chunk)  # (N, P, Tq, Cv)


def _chunk_indices(r_idx: jax.Array, r_weight: Optional[jax.Array], chunk: int):
    """(N, P, K) -> (K/chunk, N, P, chunk): the loop's per-step routing (and weights)."""
    n, p, k = r_idx.shape
    idx = r_idx.reshape(n, p, k // chunk, chunk).transpose(2, 0, 1, 3)  # (S, N, P, chunk)
    if r_weight is None:
        return idx, None
    w = r_weight.reshape(n, p, k // chunk, chunk).transpose(2, 0, 1, 3)  # (S, N, P, chunk)
    return idx, w


def _key_weights(w: jax.Array, tkv: int) -> jax.Array:
    """(N, P, chunk) region weights -> (N, P, 1, 1, chunk*Tkv), one per gathered key."""
    n, p, c = w.shape
    return jnp.repeat(w.astype(jnp.float32), tkv, axis=-1).reshape(n, p, 1, 1, c * tkv)


def _scores(qh, kh, idx, w, tkv):
    """Gathered keys and raw/weighted logits of one chunk.

    qh: (N, P, m, Tq, c); idx: (N, P, chunk) -> k_sel (N, P, m, chunk*Tkv, c),
    s_raw = q . k (N, P, m, Tq, chunk*Tkv) float32, s = s_raw * w (soft routing) or s_raw.
    """
    k_sel = gather_heads(kh, idx)  # (N, P, m, chunk, Tkv, c)
    k_sel = k_sel.reshape(*k_sel.shape[:3], -1, k_sel.shape[-1])  # (N, P, m, chunk*Tkv, c)
    s_raw = jnp.einsum("npmqc,npmkc->npmqk", qh, k_sel, preferred_element_type=jnp.float32)
    s = s_raw if w is None else s_raw * _key_weights(w, tkv)
    return k_sel, s_raw, s


def _gather_values(vh, idx):
    v_sel = gather_heads(vh, idx)  # (N, P, m, chunk, Tkv, cv)
    return v_sel.reshape(*v_sel.shape[:3], -1, v_sel.shape[-1])  # (N, P, m, chunk*Tkv, cv)


def _forward(qh, kh, vh, r_idx, r_weight, chunk):
    """Online softmax over the chunks. Returns out (N, P, m, Tq, cv) and lse (N, P, m, Tq)."""
    n, p, m, tq, _ = qh.shape
    tkv, cv = vh.shape[3], vh.shape[4]
    idx_s, w_s = _chunk_indices(r_idx, r_weight, chunk)

    def step(carry, xs):
        mx, l, acc = carry  # (N, P, m, Tq), (N, P, m, Tq), (N, P, m, Tq, cv) float32
        idx, w = xs
        _, _, s = _scores(qh, kh, idx, w, tkv)  # (N, P, m, Tq, chunk*Tkv)
        mx_new = jnp.maximum(mx, jnp.max(s, axis=-1))
        alpha = jnp.exp(mx - mx_new)
        prob = jnp.exp(s - mx_new[..., None])  # (N, P, m, Tq, chunk*Tkv)
        l = l * alpha + jnp.sum(prob, axis=-1)
        pv = prob if w is None else prob * _key_weights(w, tkv)
        v_sel = _gather_values(vh, idx)  # (N, P, m, chunk*Tkv, cv)
        acc = acc * alpha[..., None] + jnp.einsum(
            "npmqk,npmkc->npmqc", pv.astype(v_sel.dtype), v_sel, preferred_element_type=jnp.float32
        )
        return (mx_new, l, acc), None

    init = (
        jnp.full((n, p, m, tq), -jnp.inf, jnp.float32),
        jnp.zeros((n, p, m, tq), jnp.float32),
        jnp.zeros((n, p, m, tq, cv), jnp.float32),
    )
    (mx, l, acc), _ = jax.lax.scan(step, init, (idx_s, w_s))
    out = acc / l[..., None]  # (N, P, m, Tq, cv)
    return out, mx + jnp.log(l)


# The VJP keeps q and kv in the caller's layout (not the heads-major copies) as residuals.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attend(q, kv, r_idx, r_weight, num_heads, scale, chunk):
    qh, kh, vh = split_qkv_heads(q, kv, num_heads, scale)
    out, _ = _forward(qh, kh, vh, r_idx, r_weight, chunk)  # (N, P, m, Tq, cv)
    return merge_heads(out).astype(q.dtype)  # (N, P, Tq, Cv)


def _attend_fwd(q, kv, r_idx, r_weight, num_heads, scale, chunk):
    qh, kh, vh = split_qkv_heads(q, kv, num_heads, scale)
    out, lse = _forward(qh, kh, vh, r_idx, r_weight, chunk)
    out = merge_heads(out).astype(q.dtype)  # (N, P, Tq, Cv)
    return out, (q, kv, r_idx, r_weight, out, lse)


def _attend_bwd(num_heads, scale, chunk, res, dout):
    q, kv, r_idx, r_weight, out, lse = res
    q, kv, lse = tie(dout, q, kv, lse)  # keep the recomputation in the backward pass
    qh, kh, vh = split_qkv_heads(q, kv, num_heads, scale)
    n, p, m, tq, _ = qh.shape
    tkv = vh.shape[3]
    idx_s, w_s = _chunk_indices(r_idx, r_weight, chunk)
    dout32 = split_heads(dout, num_heads).astype(jnp.float32)  # (N, P, m, Tq, cv)
    out32 = split_heads(out, num_heads).astype(jnp.float32)
    delta = jnp.sum(dout32 * out32, axis=-1)  # (N, P, m, Tq)
    ni = jnp.arange(n)[:, None, None, None]  # (N, 1, 1, 1)
    mi = jnp.arange(m)[None, None, :, None]  # (1, 1, m, 1)

    def scatter_add(acc, idx, upd):
        # upd: (N, P, m, chunk*Tkv, c) -> added to acc (N, P', m, Tkv, c) at region idx.
        upd = upd.reshape(n, p, m, idx.shape[-1], tkv, upd.shape[-1])  # (N, P, m, chunk, Tkv, c)
        return acc.at[ni, idx[:, :, None, :], mi].add(upd, mode="promise_in_bounds")

    def step(carry, xs):
        dq, dk, dv = carry
        idx, w = xs
        k_sel, s_raw, s = _scores(qh, kh, idx, w, tkv)
        v_sel = _gather_values(vh, idx)
        prob = jnp.exp(s - lse[..., None])  # (N, P, m, Tq, chunk*Tkv)
        wk = None if w is None else _key_weights(w, tkv)
        pv = prob if wk is None else prob * wk
        dv = scatter_add(dv, idx, jnp.einsum("npmqk,npmqc->npmkc", pv, dout32))
        dpv = jnp.einsum("npmqc,npmkc->npmqk", dout32, v_sel, preferred_element_type=jnp.float32)
        dprob = dpv if wk is None else dpv * wk
        ds = prob * (dprob - delta[..., None])  # d loss / d s
        ds_raw = ds if wk is None else ds * wk  # d loss / d (q . k)
        dq = dq + jnp.einsum("npmqk,npmkc->npmqc", ds_raw, k_sel, preferred_element_type=jnp.float32)
        dk = scatter_add(dk, idx, jnp.einsum("npmqk,npmqc->npmkc", ds_raw, qh, preferred_element_type=jnp.float32))
        if w is None:
            return (dq, dk, dv), None
        # s = w * s_raw and the values are scaled by w: both paths reach the region weight.
        dw = (ds * s_raw + prob * dpv).reshape(n, p, m, tq, idx.shape[-1], tkv)  # (N, P, m, Tq, chunk, Tkv)
        return (dq, dk, dv), jnp.sum(dw, axis=(2, 3, 5))  # (N, P, chunk)

    init = (
        jnp.zeros(qh.shape, jnp.float32),
        jnp.zeros(kh.shape, jnp.float32),
        jnp.zeros(vh.shape, jnp.float32),
    )
    (dq, dk, dv), dw_s = jax.lax.scan(step, init, (idx_s, w_s))
    dw = None
    if r_weight is not None:
        dw = dw_s.transpose(1, 2, 0, 3).reshape(r_weight.shape).astype(r_weight.dtype)  # (N, P, K)
    dq = merge_heads(dq * scale).astype(q.dtype)  # (N, P, Tq, Cqk)
    dkv = jnp.concatenate([merge_heads(dk), merge_heads(dv)], axis=-1).astype(kv.dtype)  # (N, P, Tkv, Cqk+Cv)
    return dq, dkv, None, dw


_attend.defvjp(_attend_fwd, _attend_bwd)
