"""Top-k over the last axis that breaks exact ties the way PyTorch's CPU `torch.topk` does.

Why: routing picks the top-k regions by score, and regions made only of zero padding score
exactly alike. `jax.lax.top_k` keeps the lowest indices among equals; PyTorch's CPU kernel
(for k * 64 > n, which covers every BiFormer / DeBiFormer router at n_win <= 7) runs
`std::nth_element` (libstdc++'s introselect) on (value, index) pairs compared by value
only, so which of several equal regions it keeps depends on how the partitioning goes.
Both choices give the same outputs (the tied regions hold the same keys and values), but a
port that is held to the official region sets must pick the same ones. `topk(..., "torch")`
replays introselect, one median-of-three Hoare partition per step, vectorised over the row;
the selected set is torch's, the order within it is by descending value (then index).

Not replayed: the heap-select fallback that introselect takes after 2*log2(n) unbalanced
partitions (never observed on score rows; the remaining window is then ordered stably), and
torch's partial_sort path for k * 64 <= n (n >= 64 regions), which is torch's choice exactly
only for k = 1; both then keep the lowest indices among equals, like lax.top_k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TIES = ("xla", "torch")


def topk(x: jax.Array, k: int, ties: str = "xla") -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the k largest entries of each row of x (..., n), largest first."""
    if ties not in TIES:
        raise ValueError(f"ties={ties!r} is not one of {TIES}.")
    n = x.shape[-1]
    if ties == "xla" or k * 64 <= n or k >= n:
        return jax.lax.top_k(x, k)
    flat = x.reshape(-1, n)  # (rows, n)
    perm = jax.vmap(lambda row: _introselect(row, k - 1))(jax.lax.stop_gradient(flat))  # (rows, n)
    chosen = perm[:, :k]  # (rows, k): torch's set, in partition order
    vals = jnp.take_along_axis(flat, chosen, axis=-1)  # (rows, k)
    # Order the set like lax.top_k (descending value, then ascending index).
    order = jnp.lexsort((chosen, -jax.lax.stop_gradient(vals)), axis=-1)  # (rows, k)
    idx = jnp.take_along_axis(chosen, order, axis=-1)
    vals = jnp.take_along_axis(vals, order, axis=-1)
    return vals.reshape(*x.shape[:-1], k), idx.reshape(*x.shape[:-1], k)


def _greater(a: jax.Array, b: jax.Array) -> jax.Array:
    """torch's comparator for 'largest': NaN above everything, else a > b."""
    return (jnp.isnan(a) & ~jnp.isnan(b)) | (a > b)


def _introselect(v: jax.Array, nth: int) -> jax.Array:
    """std::nth_element(first, first + nth, last, greater) on (v[i], i); returns the index order."""
    n = v.shape[0]
    pos = jnp.arange(n)
    depth = 2 * (n.bit_length() - 1)  # 2 * std::__lg(n)

    def cond(state):
        _, _, first, last, d = state
        return (last - first > 3) & (d > 0)

    def body(state):
        vals, idx, first, last, d = state
        # __move_median_to_first(first, first + 1, mid, last - 1)
        a, b, c = first + 1, first + (last - first) // 2, last - 1
        va, vb, vc = vals[a], vals[b], vals[c]
        ab, bc, ac = _greater(va, vb), _greater(vb, vc), _greater(va, vc)
        median = jnp.where(
            ab,
            jnp.where(bc, b, jnp.where(ac, c, a)),
            jnp.where(ac, a, jnp.where(bc, c, b)),
        )
        vals, idx = _swap(vals, idx, first, median)
        pivot = vals[first]
        # __unguarded_partition(first + 1, last, pivot): the j-th stop of the left scan
        # (an element not above the pivot) swaps with the j-th stop of the right scan (an
        # element not below it) while the left one comes first.
        in_range = (pos > first) & (pos < last)
        lstop = in_range & ~_greater(vals, pivot)
        rstop = in_range & ~_greater(pivot, vals)
        lrank = jnp.cumsum(lstop) - 1  # 0-based rank among left stops, ascending
        rrank = jnp.cumsum(rstop[::-1])[::-1] - 1  # among right stops, descending
        big = n + 1
        lpos = jnp.full(n + 1, big).at[jnp.where(lstop, lrank, n)].set(pos, mode="drop")  # (n+1,)
        rpos = jnp.full(n + 1, -1).at[jnp.where(rstop, rrank, n)].set(pos, mode="drop")  # (n+1,)
        lpos, rpos = lpos.at[n].set(big), rpos.at[n].set(-1)
        paired = lpos < rpos  # a prefix: lpos increases, rpos decreases
        s = jnp.sum(paired)
        swap_to = pos
        swap_to = swap_to.at[jnp.where(paired, lpos, n)].set(rpos, mode="drop")
        swap_to = swap_to.at[jnp.where(paired, rpos, n)].set(lpos, mode="drop")
        vals, idx = vals[swap_to], idx[swap_to]
        cut = jnp.where(s == 0, lpos[0], jnp.minimum(lpos[s], rpos[jnp.maximum(s - 1, 0)]))
        first, last = jnp.where(cut <= nth, cut, first), jnp.where(cut <= nth, last, cut)
        return vals, idx, first, last, d - 1

    vals, idx, first, last, _ = jax.lax.while_loop(cond, body, (v, pos, jnp.int32(0), jnp.int32(n), jnp.int32(depth)))
    # __insertion_sort(first, last): a stable sort of the remaining window (<= 3 entries, or
    # the depth-exhausted window, see the module docstring), descending by the comparator.
    in_win = (pos >= first) & (pos < last)  # (n,)
    above = _greater(vals[None, :], vals[:, None])  # (n, n): [i, j] = v_j ranks before v_i
    tied = ~above & ~_greater(vals[:, None], vals[None, :])
    before = in_win[None, :] & (above | (tied & (pos[None, :] < pos[:, None])))  # (n, n)
    key = jnp.where(in_win, first + jnp.sum(before, axis=1), pos)  # each entry's final place
    return idx[jnp.argsort(key)]


def _swap(vals: jax.Array, idx: jax.Array, i, j) -> tuple[jax.Array, jax.Array]:
    vi, vj, ii, ij = vals[i], vals[j], idx[i], idx[j]
    return vals.at[i].set(vj).at[j].set(vi), idx.at[i].set(ij).at[j].set(ii)
