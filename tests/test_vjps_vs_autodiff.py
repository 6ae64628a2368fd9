"""Every hand-written VJP against JAX's autodiff of the same function, float32 and float64 (issue 16, item 9).

Each reference below is the function the custom VJP claims to differentiate, written from its
definition in plain `jnp` (no project code, no custom rule, no float32 accumulation), so
`jax.vjp` of it is autodiff's answer and a bug in a shared helper cannot hide in both sides
(issue 25, item 7). Both get the same inputs and the same random cotangent; every input
gradient must agree to a relative L2 error far below what a wrong formula gives (a dropped term
or a sign is an O(1) error). In float64 (the `jax.enable_x64` context) the reference computes in
float64 all the way: what is left is the custom rule's own rounding (several of them compute
in float32 by design).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biformer_jax.ops import chunked_routed_attention as chunked
from biformer_jax.ops import depthwise, fused
from biformer_jax.ops import routed_attention as ra
from biformer_jax.ops.pallas_dispatch import pallas_routed_attention

# Bounds on the relative L2 error of each gradient: float32 (both sides round) and float64
# (the reference exact; the custom rules that compute in float32 round to ~1e-7).
BOUND = {"float32": 2e-5, "float64": 2e-6}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _random(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def assert_vjp_matches(custom, reference, args, dtype, *, diff_argnums=None, seed=1):
    """Same outputs, and the same gradients for a random cotangent, from `custom` and autodiff of `reference`."""
    diff_argnums = tuple(range(len(args))) if diff_argnums is None else diff_argnums

    def restrict(fn):
        def f(*diff):
            full = list(args)
            for i, value in zip(diff_argnums, diff):
                full[i] = value
            return fn(*full)

        return f

    diff = [args[i] for i in diff_argnums]
    shapes = jax.eval_shape(restrict(reference), *diff)
    rng = np.random.default_rng(seed)
    cot = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), shapes)

    @functools.partial(jax.jit, static_argnums=0)  # one program each: eager ops would compile one per op
    def outputs_and_grads(fn, diff, cot):
        out, vjp = jax.vjp(restrict(fn), *diff)
        return out, vjp(cot)

    out_c, grads_c = outputs_and_grads(custom, diff, cot)
    out_r, grads_r = outputs_and_grads(reference, diff, cot)
    leaves = jax.tree.leaves(out_r)
    for a, b in zip(jax.tree.leaves(out_c), leaves):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        assert rel_l2(a, b) < BOUND[dtype], ("output", rel_l2(a, b))
    errors = [rel_l2(a, b) for a, b in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_r))]
    assert len(errors) == len(jax.tree.leaves(grads_r)) > 0
    assert max(errors) < BOUND[dtype], errors
    return errors


# The references: the same functions from their definitions, plain jnp, autodiff only.


def gelu_ref(x):
    """The exact GELU, x * Phi(x)."""
    return 0.5 * x * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0)))


def softmax_ref(logits):
    """exp / sum over the last axis; -inf logits get probability 0 (their exp is 0)."""
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


def layer_norm_ref(x, scale, bias, eps=1e-6):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def depthwise_conv_ref(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def masked_attention_ref(qh, kh, vh, routed):
    """qh (N, m, P*Tq, c), kh (N, m, P*Tkv, c), vh (N, m, P*Tkv, cv), routed (N, P, P'): query
    token i attends to key token j iff routed[region(i), region(j)]."""
    p = routed.shape[1]
    tq, tkv = qh.shape[2] // p, kh.shape[2] // p
    mask = jnp.repeat(jnp.repeat(routed, tq, axis=1), tkv, axis=2)  # (N, P*Tq, P*Tkv)
    logits = jnp.einsum("nmqc,nmkc->nmqk", qh, kh)  # (N, m, P*Tq, P*Tkv), in the inputs' dtype
    return jnp.einsum("nmqk,nmkc->nmqc", softmax_ref(jnp.where(mask[:, None], logits, -jnp.inf)), vh)


def routed_attention_ref(q, kv, r_idx, r_weight, num_heads, scale):
    """BRA's token attention, per image n, query region p and head h:
    softmax(scale q_h K_h^T) V_h over the keys/values of the regions r_idx[n, p] (concatenated
    in routing order), each region's keys and values times its weight r_weight[n, p, k] (soft).

    q (N, P, Tq, Cqk), kv (N, P, Tkv, Cqk + Cv), channels (heads, width) heads major."""
    n, p, tq, cqk = q.shape
    topk, tkv, m = r_idx.shape[-1], kv.shape[2], num_heads
    batch = jnp.arange(n)[:, None, None]  # (N, 1, 1)
    k_sel, v_sel = kv[batch, r_idx][..., :cqk], kv[batch, r_idx][..., cqk:]  # (N, P, K, Tkv, C)
    if r_weight is not None:
        k_sel = k_sel * r_weight[..., None, None]
        v_sel = v_sel * r_weight[..., None, None]
    k_sel = k_sel.reshape(n, p, topk * tkv, m, cqk // m)  # (N, P, K*Tkv, m, c)
    v_sel = v_sel.reshape(n, p, topk * tkv, m, -1)  # (N, P, K*Tkv, m, cv)
    qh = (q * scale).reshape(n, p, tq, m, cqk // m)  # (N, P, Tq, m, c)
    probs = softmax_ref(jnp.einsum("npqmc,npkmc->npmqk", qh, k_sel))  # (N, P, m, Tq, K*Tkv)
    return jnp.einsum("npmqk,npkmc->npqmc", probs, v_sel).reshape(n, p, tq, -1)  # (N, P, Tq, Cv)


DTYPES = ["float32", "float64"]


def _in_dtype(dtype):
    return jax.enable_x64(dtype == "float64")  # a context: float64 arrays exist only inside it


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dtype):
    with _in_dtype(dtype):
        (x,) = _random([(4, 7, 33)], dtype)
        x = x * 3  # reach the tails
        assert_vjp_matches(fused.gelu, gelu_ref, (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype):
    with _in_dtype(dtype):
        x, scale, bias = _random([(3, 5, 24), (24,), (24,)], dtype)
        x = 2.0 * x + 0.5  # a mean and a spread to normalise away
        assert_vjp_matches(lambda x, s, b: fused.layer_norm(x, s, b, 1e-6), layer_norm_ref, (x, scale, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [False, True])
def test_layer_norm_dense(dtype, split):
    with _in_dtype(dtype):
        x, scale, bias, kernel, dbias = _random([(2, 6, 16), (16,), (16,), (16, 40), (40,)], dtype)
        if split:  # the fused norm + qkv Linear, q and kv returned apart
            kernels, biases = (kernel[:, :12], kernel[:, 12:]), (dbias[:12], dbias[12:])
        else:
            kernels, biases = (kernel,), (dbias,)

        def ref(x, s, b, ks, bs):
            y = layer_norm_ref(x, s, b)
            return tuple(jnp.dot(y, k) + c for k, c in zip(ks, bs))

        assert_vjp_matches(
            lambda x, s, b, ks, bs: fused.layer_norm_dense(x, s, b, ks, bs, 1e-6),
            ref,
            (x, scale, bias, kernels, biases),
            dtype,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_dense(dtype):
    with _in_dtype(dtype):
        x, kernel, bias = _random([(2, 5, 24), (24, 10), (10,)], dtype)
        assert_vjp_matches(fused.gelu_dense, lambda x, k, b: jnp.dot(gelu_ref(x), k) + b, (x * 2, kernel, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k, padding, width", [(3, 1, 8), (5, 2, 11), (3, 0, 13), (7, 3, 6)])
def test_shifted_depthwise_conv(dtype, k, padding, width):
    """Widths that are and are not whole kernel-gradient blocks, 'same' and 'valid' padding."""
    with _in_dtype(dtype):
        x, kernel = _random([(2, 9, width, 6), (k, k, 1, 6)], dtype)
        assert_vjp_matches(
            lambda x, w: depthwise.shift_depthwise_conv(x, w, padding),
            lambda x, w: depthwise_conv_ref(x, w, padding),
            (x, kernel),
            dtype,
        )


def _routing(n, p, topk, seed=0):
    rng = np.random.default_rng(seed)
    r_idx = np.stack([np.stack([rng.permutation(p)[:topk] for _ in range(p)]) for _ in range(n)])
    return jnp.asarray(r_idx, jnp.int32)  # (N, P, K): distinct regions per query region


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_masked_attention(dtype):
    n, m, p, tq, tkv, c, cv, topk = 2, 2, 4, 3, 5, 8, 6, 2
    with _in_dtype(dtype):
        r_idx = _routing(n, p, topk)
        routed = (
            jnp.zeros((n, p, p), bool).at[jnp.arange(n)[:, None, None], jnp.arange(p)[None, :, None], r_idx].set(True)
        )  # (N, P, P')
        qh, kh, vh = _random([(n, m, p * tq, c), (n, m, p * tkv, c), (n, m, p * tkv, cv)], dtype)
        assert_vjp_matches(
            ra._dense_masked_attention, masked_attention_ref, (qh, kh, vh, routed), dtype, diff_argnums=(0, 1, 2)
        )


# The Pallas kernels compute in float32 (no TPU or GPU kernel has a float64 path): float32 only.
ROUTED_CASES = [
    (impl, dtype)
    for impl in ("masked", "chunked", "gather", "pallas_tpu", "pallas_gpu", "pallas_xla")
    for dtype in DTYPES
    if dtype == "float32" or impl not in ("pallas_tpu", "pallas_gpu")
]


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("impl, dtype", ROUTED_CASES)
def test_routed_attention_impls(dtype, soft, impl):
    """The masked (hard routing: its own VJP), chunked (online softmax: its own VJP) and Pallas
    (one VJP around the kernels: the TPU and GPU kernels in their interpreters, and its XLA
    path) implementations, and 'gather' (autodiff)."""
    n, p, tq, tkv, heads, cqk, cv, topk = 2, 4, 3, 5, 2, 8, 6, 2
    with _in_dtype(dtype):
        q, kv, w = _random([(n, p, tq, cqk), (n, p, tkv, cqk + cv), (n, p, topk)], dtype)
        r_idx = _routing(n, p, topk)
        r_weight = jax.nn.softmax(w, axis=-1) if soft else None
        scale = cqk**-0.5
        if impl == "chunked":
            custom = lambda q, kv, w: chunked.chunked_routed_attention(  # noqa: E731
                q, kv, r_idx, w, num_heads=heads, scale=scale, chunk=1
            )
        elif impl.startswith("pallas_"):
            variant = impl.removeprefix("pallas_")
            custom = lambda q, kv, w: pallas_routed_attention(  # noqa: E731
                q, kv, r_idx, w, num_heads=heads, scale=scale, interpret=variant != "xla", variant=variant
            )
        else:
            custom = lambda q, kv, w: ra._run(impl, q, kv, r_idx, w, heads, scale)  # noqa: E731
        args, diff = ((q, kv, r_weight), (0, 1, 2)) if soft else ((q, kv, None), (0, 1))
        assert_vjp_matches(
            custom,
            lambda q, kv, w: routed_attention_ref(q, kv, r_idx, w, heads, scale),
            args,
            dtype,
            diff_argnums=diff,
        )


def test_a_wrong_vjp_fails_the_check():
    """The check itself: a custom rule with one term dropped is caught."""

    @jax.custom_vjp
    def broken_gelu(x):
        return gelu_ref(x)

    def fwd(x):
        return gelu_ref(x), x

    def bwd(x, g):
        return (g * 0.5 * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0))),)  # the x * pdf(x) term dropped

    broken_gelu.defvjp(fwd, bwd)
    (x,) = _random([(4, 7, 33)], "float32")
    with pytest.raises(AssertionError):
        assert_vjp_matches(broken_gelu, gelu_ref, (x,), "float32")
