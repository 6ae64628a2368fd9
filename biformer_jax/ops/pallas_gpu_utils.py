"""Mosaic GPU plumbing for the routed-attention kernels (`pallas_gpu_routed_attention`):
wgmma matmuls and layouts (or their plain-JAX stand-ins in the interpreter), swizzled SMEM
tiles, and the kernel launch."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

BLOCK = 64  # rows per tile: the wgmma M of one warpgroup
_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def interpret_params():
    """The Mosaic GPU interpreter's parameters (private in JAX 0.10; public names vary)."""
    params = getattr(plgpu, "InterpretParams", None) or getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


class Ops:
    """Matmuls, layouts and vector loads: wgmma and Mosaic GPU layouts, or plain JAX when
    interpreting (the interpreter lowers ordinary primitives with XLA)."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def lc(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def zeros(self, shape, layout):
        return self.lc(jnp.zeros(shape, jnp.float32), layout)

    def full(self, shape, value, layout):
        return self.lc(jnp.full(shape, value, jnp.float32), layout)

    def col_iota(self, shape):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, 1)
        return plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)

    def vload(self, ref, start, layout):
        """A (BLOCK,) float32 vector from ref[start:start+BLOCK] (GMEM) in `layout`."""
        if self.interpret:
            return ref[pl.ds(start, BLOCK)]
        return plgpu.load(ref, pl.ds(start, BLOCK), layout=layout, optimized=False)

    def mm_nt(self, a_ref, b_ref):
        """a @ b^T, both in SMEM: (M, c) x (N, c) -> (M, N) float32."""
        if self.interpret:
            return lax.dot_general(a_ref[...], b_ref[...], _NT, preferred_element_type=jnp.float32)

        def f(acc_ref):
            plgpu.wgmma(acc_ref, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))
            return acc_ref[...]

        return pl.run_scoped(f, plgpu.ACC((a_ref.shape[0], b_ref.shape[0]), jnp.float32))

    def mm_nn(self, a, b_ref):
        """a @ b with a in registers (16-bit) and b in SMEM: (M, K) x (K, N) -> (M, N) float32."""
        if self.interpret:
            return lax.dot_general(a, b_ref[...], _NN, preferred_element_type=jnp.float32)

        def f(acc_ref):
            plgpu.wgmma(acc_ref, a, b_ref)
            return acc_ref[...]

        return pl.run_scoped(f, plgpu.ACC((a.shape[0], b_ref.shape[1]), jnp.float32))


def smem(shape, dtype):
    """A swizzled SMEM tile (or ring of tiles) usable as a wgmma operand."""
    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(shape[-1] * itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def launch(body, inputs, out_type, scratch, grid, interpret: bool):
    """body(ids, *input_refs, *output_refs, *scratch_refs) over `grid`, every operand in
    GMEM; ids() gives the instance's grid indices.

    `plgpu.kernel` lowers through `mpmd_map`, which refuses a multi-platform lowering
    context: `pallas_dispatch` lowers the GPU kernels in a context holding 'cuda' alone, so
    one artifact can still carry cpu, cuda and tpu code.
    """
    names = tuple(f"g{i}" for i in range(len(grid)))
    kernel = functools.partial(body, lambda: tuple(lax.axis_index(a) for a in names))
    kernel.__name__ = body.__name__
    run = plgpu.kernel(
        kernel,
        out_type=list(out_type),
        scratch_types=scratch,
        grid=grid,
        grid_names=names,
        interpret=interpret_params() if interpret else None,
    )
    return run(*inputs)


def row(x, shape, axis):
    """Broadcast a (BLOCK,) vector along `axis` of a 2D tile."""
    return lax.broadcast_in_dim(x, shape, [1 - axis])
