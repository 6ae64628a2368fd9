"""What differentiating a scan over per-block weights costs: picked by `lax.switch` or stacked.

    python benchmarks/switch_transpose.py --depths=4,8,16,32

A toy stage (depth blocks of x + W2 gelu(W1 x), width 256, batch 512) run as one `lax.scan`
whose step j takes block j's weights either with `lax.switch` over the per-block list (the
inference form, `stages.scanned_blocks`) or as a slice of the weights stacked with
`jnp.stack` before the scan (the training form, `stages.scanned_train_blocks`). Prints, per
depth and form, the compiled gradient's FLOPs and bytes accessed (XLA's cost analysis), its
temporary memory and its run time. The switch's transpose hands every block's weights a
cotangent on every iteration (zeros but for block j), so its cost grows with depth squared.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp


def stage(form: str, weights: list, x: jax.Array) -> jax.Array:
    def block(w, h):
        return h + jax.nn.gelu(h @ w[0]) @ w[1]

    if form == "switch":

        def step(h, j):
            w = jax.lax.switch(j, [lambda ws, k=k: ws[k] for k in range(len(weights))], weights)
            return block(w, h), None

        return jax.lax.scan(step, x, jnp.arange(len(weights)))[0]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *weights)
    return jax.lax.scan(lambda h, w: (block(w, h), None), x, stacked)[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="4,8,16,32")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args(argv)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (args.batch, args.width))
    for depth in map(int, args.depths.split(",")):
        ws = [
            (0.05 * jax.random.normal(jax.random.fold_in(keys[1], j), (args.width, args.width)),) * 2
            for j in range(depth)
        ]
        for form in ("switch", "stacked"):
            grad = jax.jit(jax.grad(lambda w, x, f=form: jnp.sum(stage(f, w, x) ** 2)))
            compiled = grad.lower(ws, x).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            jax.block_until_ready(compiled(ws, x))
            t0 = time.perf_counter()
            for _ in range(5):
                jax.block_until_ready(compiled(ws, x))
            ms = (time.perf_counter() - t0) / 5 * 1e3
            temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
            print(
                f"depth {depth:3d} {form:8s} GFLOP {cost['flops'] / 1e9:7.2f}  GB accessed "
                f"{cost['bytes accessed'] / 1e9:7.2f}  temp {temp:7.1f} MiB  {ms:8.1f} ms",
                flush=True,
            )


if __name__ == "__main__":
    main()
