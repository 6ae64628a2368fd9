"""Token-to-token attention over routed regions, the second level of BRA.

Every implementation computes, for each query region p of each image n,

    softmax(scale * q[n, p] @ K_sel^T) @ V_sel,   K_sel/V_sel = kv[n, r_idx[n, p, :]]

with the keys of the `topk` routed regions concatenated, per head. With soft routing the
gathered keys and values are both multiplied by the routing weight of their region, as the
official `KVGather(mul_weight='soft')` does.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLS = ("gather",)


def gather_regions(kv: jax.Array, r_idx: jax.Array) -> jax.Array:
    """kv: (N, P, T, C), r_idx: (N, P, K) -> (N, P, K, T, C).

    Indexes the region axis of kv directly, so the backward pass is a scatter-add into a
    tensor of kv's size (the official gather from an expanded view allocates P times more).
    """
    n, p, t, c = kv.shape
    k = r_idx.shape[-1]
    flat = kv.reshape(n, p, t * c)  # (N, P, T*C)
    idx = r_idx.reshape(n, p * k, 1)  # (N, P*K, 1)
    sel = jnp.take_along_axis(flat, idx, axis=1)  # (N, P*K, T*C)
    return sel.reshape(n, p, k, t, c)  # (N, P, K, T, C)


def routed_attention(
    q: jax.Array,
    kv: jax.Array,
    r_idx: jax.Array,
    r_weight: Optional[jax.Array],
    *,
    num_heads: int,
    scale: float,
    impl: str = "gather",
) -> jax.Array:
    """Attention of each query region over its routed key/value regions.

    Args:
      q: (N, P, Tq, Cqk) queries grouped by region.
      kv: (N, P, Tkv, Cqk + Cv) keys then values, grouped by region (possibly pooled).
      r_idx: (N, P, K) int, the routed regions of each query region.
      r_weight: (N, P, K) routing weights, or None (hard routing).
      num_heads: heads; Cqk and Cv split as (heads, width) with heads major.
      scale: multiplier of q before the dot product.
      impl: 'gather' materialises the K routed regions per query region.
    Returns:
      (N, P, Tq, Cv).
    """
    if impl != "gather":
        raise ValueError(f"routed attention impl={impl!r} is not one of {IMPLS}.")
    n, p, tq, cqk = q.shape
    cv = kv.shape[-1] - cqk
    m = num_heads
    sel = gather_regions(kv, r_idx)  # (N, P, K, Tkv, Cqk+Cv)
    if r_weight is not None:
        sel = sel * r_weight[..., None, None].astype(sel.dtype)
    k_sel = sel[..., :cqk].reshape(n, p, -1, m, cqk // m)  # (N, P, K*Tkv, m, Cqk/m)
    v_sel = sel[..., cqk:].reshape(n, p, -1, m, cv // m)  # (N, P, K*Tkv, m, Cv/m)
    qh = (q * scale).reshape(n, p, tq, m, cqk // m)  # (N, P, Tq, m, Cqk/m)
    logits = jnp.einsum("npqmc,npkmc->npmqk", qh, k_sel, preferred_element_type=jnp.float32)
    attn = jax.nn.softmax(logits, axis=-1).astype(v_sel.dtype)  # (N, P, m, Tq, K*Tkv)
    out = jnp.einsum("npmqk,npkmc->npqmc", attn, v_sel)  # (N, P, Tq, m, Cv/m)
    return out.reshape(n, p, tq, cv)
