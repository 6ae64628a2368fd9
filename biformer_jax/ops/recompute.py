"""Keeping a backward pass's recomputation in the backward pass.

The hand-written VJPs of `ops` (fused.py: GELU, LayerNorm and their Linears; depthwise.py;
chunked_routed_attention.py) keep a small residual and recompute the rest in the backward
pass. Left alone, XLA merges that
recomputation with the forward pass's identical expressions (CSE), or schedules it as soon
as its forward inputs exist, and then holds the result from the forward pass to the
backward: exactly the memory the VJP was written to save. `jax.lax.optimization_barrier`
does not prevent this on XLA:CPU (measured: no change in the compiled temp size), so
`tie` makes the recomputed values depend on the incoming cotangent instead.
"""

from __future__ import annotations

import jax


def tie(dep: jax.Array, *xs: jax.Array):
    """Returns xs unchanged in value but data-dependent on `dep` (adds 0 * one element of it).

    If that element of dep is inf or nan the results are nan, which only happens when the
    cotangent itself is non-finite (and the gradient is then non-finite anyway).
    """
    zero = 0.0 * dep[(0,) * dep.ndim]
    out = tuple(x + zero.astype(x.dtype) for x in xs)
    return out[0] if len(out) == 1 else out
