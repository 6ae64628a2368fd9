"""`routed_attention(impl='pallas')`: one op whose code follows the platform it is lowered for.

The kernel is chosen per *lowering platform*, not by the process's default backend, so
one `jax.export` artifact carries all three:

- 'cuda': the Mosaic GPU kernels (`pallas_gpu_routed_attention`, Hopper wgmma + TMA);
- 'tpu': the Mosaic TPU kernels (`pallas_routed_attention`, scalar-prefetched routing);
- 'cpu' and any other platform (ROCm: Mosaic GPU is NVIDIA-only): the XLA gather path.

One custom VJP around all of them: its residuals are platform-neutral (the heads-major
operands, output and per-row log-sum-exp (N, P, m, Tq) float32), and the backward picks
its kernels the same way. `variant` forces one ('gpu', 'tpu', 'xla'), which tests use to
run a variant in its interpreter on CPU.

Why a primitive and not `jax.lax.platform_dependent`: the branches of a platform-dependent
`cond` are lowered for *every* platform of a multi-platform export, and Pallas kernels
refuse that: a `pallas_call` has no lowering for the other platforms ("Only interpret mode
is supported on CPU backend"), and `plgpu.kernel` refuses multi-platform lowering outright.
`_per_platform_p` registers one lowering rule per platform (`mlir.register_lowering(...,
platform=...)`); JAX lowers each rule with only its own platform in the context, so the GPU
kernel is lowered for 'cuda' alone, the TPU kernel for 'tpu' alone, and the XLA path for
the rest. Its functions are traced at lowering time, so a CPU run never traces the kernels.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

try:
    from jax.core import ShapedArray
except ImportError:  # moved in a later JAX
    from jax._src.core import ShapedArray

from biformer_jax.ops import pallas_gpu_routed_attention as gpu
from biformer_jax.ops import pallas_routed_attention as tpu
from biformer_jax.ops.heads import gather_heads, merge_heads, split_qkv_heads

VARIANTS = ("gpu", "tpu", "xla")


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

    variant: None (per lowering platform, see the module docstring) or one of VARIANTS.
    interpret: run the kernels in their Pallas interpreter on CPU (tests): the Mosaic GPU
      interpreter for 'gpu', TPU interpret mode for 'tpu' (the default with variant=None).
    """
    if interpret and variant is None:
        variant = "tpu"
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS} (or None: per lowering platform).")
    qh, kh, vh = split_qkv_heads(q, kv, num_heads, scale)  # (N, P, m, Tq, d), (N, P, m, Tkv, d / dv)
    soft = r_weight is not None
    w = r_weight.astype(jnp.float32) if soft else jnp.ones(r_idx.shape, jnp.float32)
    out = _attend(qh, kh, vh, r_idx.astype(jnp.int32), w, soft, variant, interpret)  # (N, P, m, Tq, dv)
    return merge_heads(out).astype(q.dtype)  # (N, P, Tq, Cv)


# variant run when lowering for each platform; every other platform gets "xla"
PLATFORM_VARIANTS = {"cuda": "gpu", "tpu": "tpu"}


def _per_platform(fn, variant, *args):
    """fn(variant, *args) for the given variant, or chosen by the lowering platform.

    Every argument and result has the batch N as its leading axis."""
    if variant is not None:
        return fn(variant, *args)

    def call(*args):
        out_avals = jax.eval_shape(functools.partial(fn, "xla"), *args)
        flat_out, tree = jax.tree.flatten(out_avals)
        flat = lambda v, *a: jax.tree.leaves(fn(v, *a))  # noqa: E731
        outs = _per_platform_p.bind(*args, fn=flat, out_avals=tuple(flat_out))
        return jax.tree.unflatten(tree, outs)

    return _batch_parallel(call, args)


def kernels_see_mesh(fn, mesh):
    """`fn` traced with `mesh` as the abstract mesh (wrap a step before `jax.jit`).

    XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be automatically
    partitioned"): under a multi-device mesh the kernels run inside a `shard_map` that
    splits the batch over the mesh axes, which needs the mesh at trace time.
    """

    def traced_under_mesh(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced_under_mesh


def _batch_parallel(call, args):
    """call(*args), in a shard_map over the batch when tracing under a multi-device mesh:
    the batch is split over the (non-manual) mesh axes, in mesh order, that divide it.
    Meshes with Auto axes (the trainer's); the XLA paths do not support Explicit ones."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return call(*args)
    n, axes, size = args[0].shape[0], [], 1
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    for name, kind in kinds.items():
        if kind != jax.sharding.AxisType.Manual and n % (size * mesh.shape[name]) == 0:
            axes.append(name)
            size *= mesh.shape[name]
    if size == 1:
        return call(*args)
    spec = jax.sharding.PartitionSpec(tuple(axes))
    return jax.shard_map(call, mesh=mesh, in_specs=spec, out_specs=spec, axis_names=set(axes), check_vma=False)(*args)


_per_platform_p = Primitive("routed_attention_per_platform")
_per_platform_p.multiple_results = True
_per_platform_p.def_abstract_eval(lambda *_, fn, out_avals: [ShapedArray(a.shape, a.dtype) for a in out_avals])
# Outside jit: lower for the default backend like any primitive.
_per_platform_p.def_impl(lambda *args, **params: jax.jit(functools.partial(_per_platform_p.bind, **params))(*args))


def _lowering(variant):
    def rule(ctx, *args, fn, out_avals):
        return mlir.lower_fun(functools.partial(fn, variant), multiple_results=True)(ctx, *args)

    return rule


mlir.register_lowering(_per_platform_p, _lowering("xla"))
for _platform, _variant in PLATFORM_VARIANTS.items():
    mlir.register_lowering(_per_platform_p, _lowering(_variant), platform=_platform)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attend(qh, kh, vh, r_idx, w, soft, variant, interpret):
    return _attend_fwd(qh, kh, vh, r_idx, w, soft, variant, interpret)[0]


def _attend_fwd(qh, kh, vh, r_idx, w, soft, variant, interpret):
    out, lse = _per_platform(functools.partial(_forward, interpret=interpret), variant, qh, kh, vh, r_idx, w)
    return out, (qh, kh, vh, r_idx, w, out, lse)


def _attend_bwd(soft, variant, interpret, res, dout):
    qh, kh, vh, r_idx, w, out, lse = res
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (N, P, m, Tq)
    dout = dout.astype(vh.dtype)
    bwd = functools.partial(_backward, soft=soft, interpret=interpret)
    dq, dk, dv, dw = _per_platform(bwd, variant, qh, kh, vh, r_idx, w, lse, dout, delta)
    dw = dw if soft else jnp.zeros_like(w)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None, dw


_attend.defvjp(_attend_fwd, _attend_bwd)


def _forward(variant, qh, kh, vh, r_idx, w, *, interpret):
    """-> out (N, P, m, Tq, dv) in vh's dtype, lse (N, P, m, Tq) float32."""
    if variant == "gpu":
        out, lse = gpu.attend_forward(qh, kh, vh, r_idx, w, interpret)
    elif variant == "tpu":
        out, lse = tpu.tpu_forward(qh, kh, vh, r_idx, w, interpret)
        lse = lse[..., 0]  # (N, P, m, Tq)
    else:
        out, lse = _xla_forward(qh, kh, vh, r_idx, w)
    return out.astype(vh.dtype), lse


def _backward(variant, qh, kh, vh, r_idx, w, lse, dout, delta, *, soft, interpret):
    """-> dq, dk, dv float32 and dw (N, P, K) float32 (meaningful with soft routing)."""
    if variant == "gpu":
        inverse = tpu.inverse_routing(r_idx)
        grads = gpu.attend_backward(qh, kh, vh, r_idx, w, lse, dout, delta, soft, inverse, interpret)
    elif variant == "tpu":
        dq, dk, dv, dw = tpu.tpu_backward(qh, kh, vh, r_idx, w, lse[..., None], dout, delta[..., None], interpret)
        grads = dq, dk, dv, jnp.sum(dw, axis=2)  # dw (N, P, m, K) -> (N, P, K)
    else:
        _, vjp = jax.vjp(lambda q, k, v, w: _xla_forward(q, k, v, r_idx, w)[0], qh, kh, vh, w)
        grads = vjp(dout.astype(jnp.float32))
    return tuple(g.astype(jnp.float32) for g in grads)


def _xla_forward(qh, kh, vh, r_idx, w):
    """The gather path on heads-major operands, with the log-sum-exp the kernels keep."""
    k_sel = gather_heads(kh, r_idx)  # (N, P, m, K, Tkv, d)
    v_sel = gather_heads(vh, r_idx)  # (N, P, m, K, Tkv, dv)
    wk = w[:, :, None, :, None, None]  # (N, P, 1, K, 1, 1)
    k_sel = (k_sel * wk.astype(k_sel.dtype)).reshape(*k_sel.shape[:3], -1, k_sel.shape[-1])  # (N, P, m, K*Tkv, d)
    v_sel = (v_sel * wk.astype(v_sel.dtype)).reshape(*v_sel.shape[:3], -1, v_sel.shape[-1])  # (N, P, m, K*Tkv, dv)
    logits = jnp.einsum("npmqc,npmkc->npmqk", qh, k_sel, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # (N, P, m, Tq)
    probs = jnp.exp(logits - lse[..., None]).astype(v_sel.dtype)  # (N, P, m, Tq, K*Tkv)
    out = jnp.einsum("npmqk,npmkc->npmqc", probs, v_sel, preferred_element_type=jnp.float32)
    return out, lse
