"""Token-to-token attention over routed regions, the second level of BRA.

Every implementation computes, for each query region p of each image n,

    softmax(scale * q[n, p] @ K_sel^T) @ V_sel,   K_sel/V_sel = kv[n, r_idx[n, p, :]]

with the keys of the `topk` routed regions concatenated, per head. With soft routing the
gathered keys and values are both multiplied by the routing weight of their region, as the
official `KVGather(mul_weight='soft')` does. The implementations differ in what they hold
in memory and how they map onto hardware:

- 'gather': gathers the topk-fold K/V (autodiff keeps it for the backward); the reference.
- 'masked': dense attention over all tokens with the non-routed regions masked out; fast
  when regions are few and topk is a large share of them (BiFormer stage 3 at 224: 16 of 49).
- 'chunked': online softmax over chunks of routed regions with a custom VJP that recomputes;
  never holds the topk-fold K/V (memory: high resolution, dense prediction).
- 'pallas': kernels that read K/V blocks by routing index, chosen per lowering platform
  (Mosaic GPU on 'cuda', Mosaic TPU on 'tpu', the XLA gather path elsewhere; see
  `pallas_dispatch`); 'pallas_interpret' runs the TPU kernels in interpret mode (CPU tests).
- 'auto': per call and per lowering platform, from the shapes (see `resolve_impl`): the
  Pallas kernel on GPU/TPU where `AUTO_KERNEL_RULES` says it is the faster choice,
  otherwise 'masked' or 'gather'; 'gather' where the region size is symbolic (a jax.export
  with symbolic height/width), which no shape rule can weigh.

The routing indices get no gradient; q and kv do, and r_weight with soft routing.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from biformer_jax.ops.chunked_routed_attention import chunked_routed_attention
from biformer_jax.ops.heads import gather_heads, merge_heads, split_qkv_heads

IMPLS = ("gather", "masked", "chunked", "pallas", "pallas_interpret", "auto")

# 'auto' uses dense masked attention when it costs at most this many times the routed
# attention's logits (P / topk) and its logits stay small (elements per image and head).
AUTO_MASKED_MAX_DENSITY_RATIO = 4
AUTO_MASKED_MAX_LOGITS = 1 << 20

# 'gather' attends the queries in slices (a loop) when one call's logits exceed this many
# elements (32 MiB in float32); see `query_steps`.
GATHER_MAX_LOGITS = 1 << 23

# 'auto' on an accelerator runs the Pallas kernel for a call whose regions are large
# enough for its blocks: at least `min_tokens` query and key tokens per region, and at
# most `max_pad_waste` times the work once both are rounded up to the kernel's `tile`
# (the GPU kernel computes on 64 x 64 tiles; TPU tiles rows by 8). Smaller regions stay
# with 'masked' / 'gather', which batch many regions per matmul. These numbers are NOT
# measured (no accelerator has run the kernels yet): `benchmarks/accelerator.py` times
# every impl on each stage's shapes and prints the winner per shape; set them from that.
AUTO_KERNEL_RULES = {
    "cuda": {"tile": 64, "min_tokens": 64, "max_pad_waste": 1.5},
    "tpu": {"tile": 8, "min_tokens": 64, "max_pad_waste": 1.5},
}


def gather_regions(kv: jax.Array, r_idx: jax.Array) -> jax.Array:
    """kv: (N, P, T, C), r_idx: (N, P, K) -> (N, P, K, T, C), region-major."""
    n, p, t, c = kv.shape
    k = r_idx.shape[-1]
    flat = kv.reshape(n, p, t * c)  # (N, P, T*C)
    idx = r_idx.reshape(n, p * k, 1)  # (N, P*K, 1)
    sel = jnp.take_along_axis(flat, idx, axis=1, mode="promise_in_bounds")  # (N, P*K, T*C)
    return sel.reshape(n, p, k, t, c)  # (N, P, K, T, C)


def check_inputs(q, kv, r_idx, r_weight, num_heads: int) -> None:
    if q.ndim != 4 or kv.ndim != 4 or q.shape[:2] != kv.shape[:2]:
        raise ValueError(
            f"routed_attention expects q (N, P, Tq, Cqk) and kv (N, P, Tkv, Cqk+Cv) over the same (N, P); "
            f"got q {q.shape} and kv {kv.shape}."
        )
    cqk, cv = q.shape[-1], kv.shape[-1] - q.shape[-1]
    if cv <= 0 or cqk % num_heads or cv % num_heads:
        raise ValueError(
            f"routed_attention splits Cqk={cqk} and Cv={cv} (kv has {kv.shape[-1]} channels) into "
            f"num_heads={num_heads} heads; both must be positive multiples of it."
        )
    if r_idx.ndim != 3 or r_idx.shape[:2] != q.shape[:2] or not jnp.issubdtype(r_idx.dtype, jnp.integer):
        raise ValueError(f"r_idx must be integer (N, P, K) = ({q.shape[0]}, {q.shape[1]}, K); got {r_idx.shape}.")
    if r_weight is not None and r_weight.shape != r_idx.shape:
        raise ValueError(f"r_weight {r_weight.shape} must have r_idx's shape {r_idx.shape} (or be None).")


def kernel_preferred(platform: str, tq: int, tkv: int) -> bool:
    """Whether 'auto' runs the Pallas kernel on `platform` for regions of tq / tkv tokens."""
    rule = AUTO_KERNEL_RULES.get(platform)
    if rule is None or min(tq, tkv) < rule["min_tokens"]:
        return False
    tile = rule["tile"]
    waste = (-(-tq // tile) * tile / tq) * (-(-tkv // tile) * tile / tkv)
    return waste <= rule["max_pad_waste"]


def resolve_impl(impl: str, q_shape, kv_shape, topk: int, platform: str = "cpu") -> str:
    """The implementation 'auto' runs for these shapes when lowered for `platform` ('cpu',
    'cuda', 'tpu', ...); other impls are returned unchanged."""
    if impl not in IMPLS:
        raise ValueError(f"routed attention impl={impl!r} is not one of {IMPLS}.")
    if impl != "auto":
        return impl
    _, p, tq, _ = q_shape
    tkv = kv_shape[2]
    if not all(isinstance(d, int) for d in (p, tq, tkv)):  # symbolic (shape-polymorphic export)
        return "gather"
    if kernel_preferred(platform, tq, tkv):
        return "pallas"
    dense_logits = (p * tq) * (p * tkv)
    if p <= AUTO_MASKED_MAX_DENSITY_RATIO * topk and dense_logits <= AUTO_MASKED_MAX_LOGITS:
        return "masked"
    return "gather"


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
      r_idx: (N, P, K) int, the routed regions of each query region (distinct per row).
      r_weight: (N, P, K) routing weights, or None (hard routing).
      num_heads: heads; Cqk and Cv split as (heads, width) with heads major.
      scale: multiplier of q before the dot product.
      impl: one of IMPLS (see the module docstring); all compute the same function.
    Returns:
      (N, P, Tq, Cv) in q's dtype.
    """
    check_inputs(q, kv, r_idx, r_weight, num_heads)
    r_idx = jax.lax.stop_gradient(r_idx)
    shapes = (q.shape, kv.shape, r_idx.shape[-1])
    choice = {p: resolve_impl(impl, *shapes, platform=p) for p in ("cpu", "cuda", "tpu")}
    if len(set(choice.values())) == 1:
        return _run(choice["cpu"], q, kv, r_idx, r_weight, num_heads, scale)
    run = functools.partial(_run, q=q, kv=kv, r_idx=r_idx, r_weight=r_weight, num_heads=num_heads, scale=scale)
    # The choice follows the platform being lowered for. (Under a multi-platform export
    # every branch is lowered for every platform: 'pallas' picks its kernel per platform
    # itself, see `pallas_dispatch`.)
    return jax.lax.platform_dependent(
        cuda=lambda: run(choice["cuda"]),
        tpu=lambda: run(choice["tpu"]),
        default=lambda: run(choice["cpu"]),
    )


def _run(impl, q, kv, r_idx, r_weight, num_heads, scale):
    if impl == "gather":
        return _gather_attention(q, kv, r_idx, r_weight, num_heads, scale)
    if impl == "masked":
        return _masked_attention(q, kv, r_idx, r_weight, num_heads, scale)
    if impl == "chunked":
        return chunked_routed_attention(q, kv, r_idx, r_weight, num_heads=num_heads, scale=scale)
    from biformer_jax.ops.pallas_dispatch import pallas_routed_attention  # loads Pallas only when used

    interpret = impl == "pallas_interpret"
    return pallas_routed_attention(q, kv, r_idx, r_weight, num_heads=num_heads, scale=scale, interpret=interpret)


def _gather_attention(q, kv, r_idx, r_weight, num_heads, scale):
    k = r_idx.shape[-1]
    tkv = kv.shape[2]
    qh, kh, vh = split_qkv_heads(q, kv, num_heads, scale)  # (N, P, m, T, c) each
    k_sel = gather_heads(kh, r_idx)  # (N, P, m, K, Tkv, c)
    v_sel = gather_heads(vh, r_idx)  # (N, P, m, K, Tkv, cv)
    if r_weight is not None:
        w = r_weight.astype(k_sel.dtype)[:, :, None, :, None, None]  # (N, P, 1, K, 1, 1)
        k_sel, v_sel = k_sel * w, v_sel * w
    k_sel = k_sel.reshape(*k_sel.shape[:3], k * tkv, -1)  # (N, P, m, K*Tkv, c)
    v_sel = v_sel.reshape(*v_sel.shape[:3], k * tkv, -1)  # (N, P, m, K*Tkv, cv)

    def attend(qc):  # (N, P, m, tq, c) -> (N, P, m, tq, cv)
        logits = jnp.einsum("npmqc,npmkc->npmqk", qc, k_sel, preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(v_sel.dtype)  # (N, P, m, tq, K*Tkv)
        return jnp.einsum("npmqk,npmkc->npmqc", attn, v_sel)

    n, p, m, tq, c = qh.shape
    sizes = (n, p, m, tq, k, tkv)
    # One step where a size is symbolic (shape-polymorphic export): no budget can be weighed.
    steps = query_steps(n * p * m * tq * k * tkv, tq) if all(isinstance(d, int) for d in sizes) else 1
    if steps == 1:
        out = attend(qh)  # (N, P, m, Tq, cv)
    else:  # the softmax is per query row: attend `steps` slices of the queries in turn
        qs = jnp.moveaxis(qh.reshape(n, p, m, steps, tq // steps, c), 3, 0)  # (S, N, P, m, Tq/S, c)
        out = jnp.moveaxis(lax.map(attend, qs), 0, 3)  # (N, P, m, S, Tq/S, cv)
        out = out.reshape(n, p, m, tq, -1)  # (N, P, m, Tq, cv)
    return merge_heads(out).astype(q.dtype)  # (N, P, Tq, Cv)


def query_steps(logits: int, tq: int) -> int:
    """How many slices of its `tq` queries per region 'gather' attends in turn, for a call with
    `logits` elements: the fewest (a divisor of tq) that keep a slice within GATHER_MAX_LOGITS.

    The logits and probabilities of one call are live at once: at the ADE20K test scale
    (512 x 2048, BiFormer-S stage 1: 64 regions of 1024 tokens, 2 heads) that is 2 x 512 MB.
    Slicing the queries (a loop) keeps each slice's at most GATHER_MAX_LOGITS elements, and
    XLA:CPU's matmul workspace with them. The budget (2^23) was set by measurement: at
    2^24 that inference peaks 0.15 GB higher in RSS, and the 512 x 512 batch-2 training step
    (two slices in stage 1 at 2^23) is as fast and 0.16 GB smaller (README, "Speed and memory").
    """
    need = -(-logits // GATHER_MAX_LOGITS)
    return next(d for d in range(min(need, tq), tq + 1) if tq % d == 0)


def _masked_attention(q, kv, r_idx, r_weight, num_heads, scale):
    """Dense attention over all P*Tkv keys, restricted to the routed regions by a mask.

    Equal to the routed attention: a masked logit is -inf, so its probability is exactly 0
    and the softmax normalises over the routed keys only. Soft routing weights scale the
    logits of their region (q . w k = w (q . k)) and the probabilities applied to V.
    """
    n, p, tq, _ = q.shape
    m = num_heads
    qh, kh, vh = (
        x.transpose(0, 2, 1, 3, 4).reshape(n, m, -1, x.shape[-1])  # (N, m, P*T, c)
        for x in split_qkv_heads(q, kv, m, scale)
    )  # (N, m, P*Tq, c), (N, m, P*Tkv, c), (N, m, P*Tkv, cv)
    routed = (
        jnp.zeros((n, p, p), jnp.bool_)
        .at[lax.iota(jnp.int32, n)[:, None, None], jnp.arange(p)[None, :, None], r_idx]
        .set(True)
    )  # (N, P, P'): query region p attends to key region p'
    if r_weight is None:
        out = _dense_masked_attention(qh, kh, vh, routed)  # (N, m, P*Tq, cv)
    else:
        out = _soft_masked_attention(qh, kh, vh, routed, r_idx, r_weight)  # (N, m, P*Tq, cv)
    out = out.reshape(n, m, p, tq, -1).transpose(0, 2, 1, 3, 4)  # (N, P, m, Tq, cv)
    return merge_heads(out).astype(q.dtype)  # (N, P, Tq, Cv)


def _masked_probs(qh, kh, routed, w6=None):
    """qh (N, m, P*Tq, c), kh (N, m, P*Tkv, c), routed (N, P, P') -> softmax probs, float32.

    w6: soft routing weights (N, 1, P, 1, P', 1) scaling the logits of their region, or None.
    """
    n, m, lq, _ = qh.shape
    lk = kh.shape[2]
    p = routed.shape[1]
    logits = jnp.einsum("nmqc,nmkc->nmqk", qh, kh, preferred_element_type=jnp.float32)  # (N, m, P*Tq, P*Tkv)
    logits = logits.reshape(n, m, p, lq // p, p, lk // p)  # (N, m, P, Tq, P', Tkv)
    if w6 is not None:
        logits = logits * w6
    logits = jnp.where(routed[:, None, :, None, :, None], logits, -jnp.inf)
    return jax.nn.softmax(logits.reshape(n, m, lq, lk), axis=-1)  # (N, m, P*Tq, P*Tkv)


@jax.custom_vjp
def _dense_masked_attention(qh, kh, vh, routed):
    """softmax(mask(qh kh^T)) vh with hard routing, and a VJP written for it.

    The backward pass uses the row sums of dO * O (Tq x cv per head) where autodiff of the
    softmax forms those of dP * P (Tq x P*Tkv), and touches neither the mask nor the
    logits: a masked probability is exactly 0, so its logit gradient P * (dP - D) is 0 too.
    On XLA:CPU this halves the forward + backward time of BiFormer-T's stage-3 attention
    (batch 8 at 224, one layer timed alone: 36 -> 18 ms) and keeps fewer activations.
    """
    return _dense_masked_fwd(qh, kh, vh, routed)[0]


def _dense_masked_fwd(qh, kh, vh, routed):
    probs = _masked_probs(qh, kh, routed)  # (N, m, P*Tq, P*Tkv) float32
    out = jnp.einsum("nmqk,nmkc->nmqc", probs.astype(vh.dtype), vh)  # (N, m, P*Tq, cv)
    return out, (qh, kh, vh, probs, out)


def _dense_masked_bwd(res, g):
    qh, kh, vh, probs, out = res
    dv = jnp.einsum("nmqk,nmqc->nmkc", probs.astype(g.dtype), g)  # (N, m, P*Tkv, cv)
    dp = jnp.einsum("nmqc,nmkc->nmqk", g, vh, preferred_element_type=jnp.float32)  # (N, m, P*Tq, P*Tkv)
    d = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # (N, m, P*Tq, 1)
    ds = (probs * (dp - d)).astype(qh.dtype)  # logit gradients; 0 where masked
    dq = jnp.einsum("nmqk,nmkc->nmqc", ds, kh)  # (N, m, P*Tq, c)
    dk = jnp.einsum("nmqk,nmqc->nmkc", ds, qh)  # (N, m, P*Tkv, c)
    return dq, dk, dv, None


_dense_masked_attention.defvjp(_dense_masked_fwd, _dense_masked_bwd)


def _soft_masked_attention(qh, kh, vh, routed, r_idx, r_weight):
    """The masked attention with soft routing weights (autodiff, r_weight gets a gradient)."""
    n, m, lq, _ = qh.shape
    lk = kh.shape[2]
    p = routed.shape[1]
    w = (
        jnp.zeros((n, p, p), jnp.float32)
        .at[lax.iota(jnp.int32, n)[:, None, None], jnp.arange(p)[None, :, None], r_idx]  # iota: see heads.gather_heads
        .set(r_weight.astype(jnp.float32))
    )  # (N, P, P'), dense routing weights
    w6 = w[:, None, :, None, :, None]  # (N, 1, P, 1, P', 1)
    probs = _masked_probs(qh, kh, routed, w6).reshape(n, m, p, lq // p, p, lk // p)  # (N, m, P, Tq, P', Tkv)
    attn = (probs * w6).reshape(n, m, lq, lk).astype(vh.dtype)  # (N, m, P*Tq, P*Tkv)
    return jnp.einsum("nmqk,nmkc->nmqc", attn, vh)  # (N, m, P*Tq, cv)
