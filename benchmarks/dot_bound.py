"""How fast a training step could be if it did nothing but its matmuls, on this machine.

    python benchmarks/dot_bound.py --model=biformer_tiny --batch=8 --res=224 --official_step_ms=3480

Compiles the same training step as benchmarks/throughput.py (the trainer's loss, AdamW and
EMA), reads every dot of the optimized program (XLA's HLO after fusion, dots inside fusions
included), and times each distinct dot (operand shapes, dtypes and dimension numbers) alone:
a jitted `lax.dot_general` on random inputs of those shapes, best of `--repeats`, using every
core. The sum over the step's dots is the time the step would take if its matmuls each ran at
their stand-alone speed one after the other and nothing else took any time: no step computing
the same matmuls on this machine can be faster. With `--official_step_ms` it also prints the
step time a `--target` speedup over the official step allows, and how much of it the matmuls
alone use.

Prints the dots that take longest, then as its last line one JSON object: dots, unique,
dot_gflop, step_gflop (XLA's cost analysis of the whole step: dots, convolutions and
elementwise ops), bound_ms, dot_gflop_per_s and, when asked, budget_ms and bound_share.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import time

import jax
import jax.numpy as jnp
import throughput

HLO_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "f64": jnp.float64}
_DEF = re.compile(r"%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_DOT = re.compile(r"\s+(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _dims(attrs: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", attrs)
    return _ints(m.group(1)) if m else ()


def program_dots(hlo_text: str) -> collections.Counter:
    """Counter of (lhs (dtype, shape), rhs (dtype, shape), dimension numbers, out dtype) over every dot."""
    defs = {m.group(1): (m.group(2), _ints(m.group(3))) for m in _DEF.finditer(hlo_text)}
    dots = collections.Counter()
    for line in hlo_text.splitlines():
        m = _DOT.match(line)
        if not m:
            continue
        out_dtype, lhs, rhs, attrs = m.group(1), defs[m.group(3)], defs[m.group(4)], m.group(5)
        dims = (
            (_dims(attrs, "lhs_contracting_dims"), _dims(attrs, "rhs_contracting_dims")),
            (_dims(attrs, "lhs_batch_dims"), _dims(attrs, "rhs_batch_dims")),
        )
        dots[(lhs, rhs, dims, out_dtype)] += 1
    return dots


def dot_flops(key) -> int:
    """2 x (output elements) x (contracted size)."""
    (_, lshape), (_, rshape), ((lc, rc), (lb, rb)), _ = key
    batch = math.prod(lshape[i] for i in lb)
    free_l = math.prod(d for i, d in enumerate(lshape) if i not in lc and i not in lb)
    free_r = math.prod(d for i, d in enumerate(rshape) if i not in rc and i not in rb)
    return 2 * batch * free_l * free_r * math.prod(lshape[i] for i in lc)


def time_dot(key, repeats: int) -> float:
    """Best wall time (s) of this dot alone, jitted, inputs already on the device."""
    (ldt, lshape), (rdt, rshape), dims, out_dtype = key
    k1, k2 = jax.random.split(jax.random.key(0))
    lhs = jax.random.normal(k1, lshape, HLO_DTYPES[ldt])
    rhs = jax.random.normal(k2, rshape, HLO_DTYPES[rdt])
    f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=HLO_DTYPES[out_dtype]))
    jax.block_until_ready(f(lhs, rhs))
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(lhs, rhs))
        best = min(best, time.perf_counter() - t)
    return best


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timings per distinct dot (the best counts)")
    ap.add_argument("--official_step_ms", type=float, default=None, help="the official step's time, measured")
    ap.add_argument("--target", type=float, default=3.0, help="speedup over the official step to budget for")
    ap.add_argument("--top", type=int, default=12, help="dots to list")
    args, rest = ap.parse_known_args(argv)
    return args, throughput.parse_args(rest + ["--mode=train"])


def main(argv=None) -> dict:
    args, bench = parse_args(argv)
    model = throughput.build_model(bench)
    images = jnp.zeros((bench.batch, bench.res, bench.res, 3), jnp.float32)
    labels = jnp.zeros((bench.batch,), jnp.int32)
    state, step, batch = throughput.build_train(model, images, labels, throughput.recipe(bench))
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    dots = program_dots(compiled.as_text())
    if not dots:
        raise SystemExit("no dot found in the compiled step's HLO: the parser does not fit this XLA version.")

    rows = []
    for key, count in dots.items():
        seconds = time_dot(key, args.repeats)
        rows.append((count * seconds, count, key, dot_flops(key) / seconds / 1e9))
    rows.sort(key=lambda r: r[0], reverse=True)
    print(f"{bench.model} batch {bench.batch} {bench.res}x{bench.res} train step (trainer): {len(rows)} distinct dots")
    for total, count, ((_, lshape), (_, rshape), _, _), rate in rows[: args.top]:
        print(f"  {total * 1e3:7.1f} ms  {count:3d} x {lshape} . {rshape}  {rate:6.1f} GFLOP/s")

    bound_s = sum(r[0] for r in rows)
    gflop = sum(count * dot_flops(key) for key, count in dots.items()) / 1e9
    result = {
        "model": bench.model,
        "batch": bench.batch,
        "res": bench.res,
        "dtype": bench.dtype,
        "train_step": "trainer",
        "dots": sum(dots.values()),
        "unique": len(dots),
        "dot_gflop": gflop,
        "step_gflop": float(cost.get("flops", float("nan"))) / 1e9,
        "bound_ms": bound_s * 1e3,
        "dot_gflop_per_s": gflop / bound_s,
        "backend": jax.default_backend(),
    }
    if args.official_step_ms:
        budget = args.official_step_ms / args.target
        result.update(target=args.target, budget_ms=budget, bound_share=result["bound_ms"] / budget)
        print(
            f"matmuls alone: {result['bound_ms']:.0f} ms; {args.target:g}x the official {args.official_step_ms:.0f} ms "
            f"step allows {budget:.0f} ms ({100 * result['bound_share']:.0f}% of it taken by the matmuls)"
        )
    print(json.dumps(result))
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    main()
