"""The online-softmax block updates of the Pallas routed-attention kernels.

One routed key/value block of one (image, query region, head) per call, FlashAttention
style; shared by every launch style (`pallas_routed_attention.py`'s 'tpu' and 'gpu').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def _dot(a, b, dims):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# Shapes per (image, region, head):
# q (Tq, d) pre-scaled, k (Tkv, d), v (Tkv, dv), w scalar routing weight (1 for hard
# routing), m/l (Tq, 1), acc (Tq, dv), lse/delta (Tq, 1), do (Tq, dv). All stats float32.


def fwd_update(q, k, v, w, m, l, acc):
    s = _dot(q, k, _NT) * w  # (Tq, Tkv)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    acc = alpha * acc + _dot((p * w).astype(v.dtype), v, _NN)
    return m_new, l, acc


def _probs(q, k, v, w, lse, do, delta):
    """Recomputed probabilities and score gradients of one routed block."""
    s_raw = _dot(q, k, _NT)  # (Tq, Tkv)
    p = jnp.exp(s_raw * w - lse)
    dpv = _dot(do, v, _NT)  # (Tq, Tkv): d loss / d (p * w)
    ds = p * (dpv * w - delta)  # d loss / d s, s = w * s_raw
    return s_raw, p, dpv, ds


def dq_update(q, k, v, w, lse, do, delta, dq):
    s_raw, p, dpv, ds = _probs(q, k, v, w, lse, do, delta)
    dq = dq + _dot((ds * w).astype(k.dtype), k, _NN)
    # w scales both the logits and the values of its region.
    dw = jnp.sum(ds * s_raw) + jnp.sum(p * dpv)
    return dq, dw


def dkv_update(q, k, v, w, lse, do, delta, dk, dv):
    _, p, _, ds = _probs(q, k, v, w, lse, do, delta)
    dv = dv + _dot((p * w).astype(do.dtype), do, _TN)  # (Tkv, dv)
    dk = dk + _dot((ds * w).astype(q.dtype), q, _TN)  # (Tkv, d)
    return dk, dv
