"""Forward cost of each variant from XLA's cost analysis, as multiply-adds (FLOPs / 2).

    python benchmarks/flops.py --models=biformer_tiny,biformer_small,biformer_base --res=224

XLA counts 2 FLOPs per multiply-add of every dot and convolution and 1 per elementwise op
(softmax, GELU, norms), so its figure sits slightly above fvcore-style counts, which the
papers report and which count matmul/conv multiply-adds only. Prints a markdown table and, as
its last line, a JSON object {model: {"gmacs": ..., "paper_gmacs": ...}}.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from biformer_jax import models

PAPER_GMACS = {
    "biformer_tiny": 2.2,
    "biformer_small": 4.5,
    "biformer_base": 9.8,
    "debiformer_tiny": 2.6,
    "debiformer_small": 5.4,
    "debiformer_base": 11.8,
}


def forward_flops(name: str, res: int, batch: int = 1) -> float:
    """FLOPs of one eval-mode forward pass of `batch` images, from the compiled program."""
    model = models.create_model(name)
    x = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="biformer_tiny,biformer_small,biformer_base")
    p.add_argument("--res", type=int, default=224)
    args = p.parse_args()
    results = {}
    print(f"| model | GMACs at {args.res} (XLA) | paper |\n|---|---|---|")
    for name in args.models.split(","):
        gmacs = forward_flops(name, args.res) / 2e9
        results[name] = {"gmacs": round(gmacs, 3), "paper_gmacs": PAPER_GMACS.get(name)}
        print(f"| {name} | {gmacs:.2f} | {PAPER_GMACS.get(name, '-')} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
