"""How attention cost grows with resolution: BRA against global and local window attention.

    python benchmarks/complexity.py --out=docs/complexity.png            # FLOPs + compiled memory
    python benchmarks/complexity.py --time --out=/tmp/complexity.png      # also run and time each

The paper's question (Zhu et al., CVPR 2023, Sec. 3.3): BRA costs O((HW)^(4/3)) when its region
count grows with the resolution as S^2 ~ (HW)^(2/3) (the S that balances the region-routing
term 2 S^4 C against the token-attention term 2 k C (HW)^2 / S^2), against O((HW)^2) for
global attention and O(HW) for attention within fixed-size local windows. Each series is one
token mixer of width --dim on a batch of one (H x W tokens), built from the project's layers:

- `global`: the topk=-2 mixer (`AttentionLePE`: global multi-head attention + LePE);
- `window`: the same qkv / LePE / output layers with every region attending only to itself
  (`routed_attention` with each region routed to itself), windows of --window x --window tokens;
- `bra_scaled`: `BiLevelRoutingAttention`, topk --topk, n_win = m^2 on an m^3 x m^3 map, i.e.
  S^2 = (HW)^(2/3), regions of m x m tokens (the paper's scaling);
- `bra_nwin7`: the same with n_win fixed at 7 (the classification models' setting), which makes
  each query see k/49 of all tokens: quadratic again.

BRA runs the `gather` implementation (the routed computation; `auto` may pick the dense masked
form, whose FLOPs are global attention's). FLOPs come from XLA's cost analysis of the compiled
forward pass (2 per multiply-add, 1 per elementwise op), memory from its memory analysis
(temporary + output bytes); nothing is executed unless --time. The exponent of each series is
the least-squares slope of log FLOPs against log tokens; `last` is the slope of its last two
points, where the quadratic / 4/3 terms have taken over from the linear projections.
The last line printed is a JSON object with every measurement and exponent.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from biformer_jax.models.attention import AttentionLePE
from biformer_jax.models.layers import DepthwiseConv2d, Dtype, dense
from biformer_jax.models.routing import BiLevelRoutingAttention, RoutingSettings, from_regions, to_regions
from biformer_jax.ops.routed_attention import routed_attention

PAPER_EXPONENTS = {"global": 2.0, "window": 1.0, "bra_scaled": 4 / 3, "bra_nwin7": 2.0}


def fit_exponent(tokens: Sequence[float], cost: Sequence[float]) -> float:
    """The least-squares slope of log(cost) against log(tokens): cost ~ tokens ** slope."""
    x, y = np.log(np.asarray(tokens, np.float64)), np.log(np.asarray(cost, np.float64))
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError(f"fitting an exponent needs at least two distinct token counts, got {list(tokens)}.")
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)


class WindowAttention(nn.Module):
    """Local window attention with BRA's layers: qkv Linear, LePE on V, output Linear.

    Every n_win x n_win region attends to its own tokens only (routed_attention with region p
    routed to p), so its cost is linear in the number of tokens for a fixed window size.
    """

    dim: int
    num_heads: int
    n_win: int
    side_dwconv: int = 5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, hh, ww, c = x.shape
        p = self.n_win
        q, kv = jnp.split(dense(3 * c, "qkv", self.dtype, jnp.float32)(x), [c], axis=-1)  # (N, H, W, C), (N, H, W, 2C)
        h, w = hh // p, ww // p
        q_pix = to_regions(q, p).reshape(n, p * p, h * w, c)  # (N, P, h*w, C)
        kv_pix = to_regions(kv, p).reshape(n, p * p, h * w, 2 * c)  # (N, P, h*w, 2C)
        own = jnp.broadcast_to(jnp.arange(p * p, dtype=jnp.int32)[None, :, None], (n, p * p, 1))  # (N, P, 1)
        out = routed_attention(q_pix, kv_pix, own, None, num_heads=self.num_heads, scale=c**-0.5, impl="gather")
        out = from_regions(out.reshape(n, p * p, h, w, c), p)  # (N, H, W, C)
        out = out + DepthwiseConv2d(self.side_dwconv, impl="conv", dtype=self.dtype, name="lepe")(kv[..., c:])
        return dense(c, "wo", self.dtype, jnp.float32)(out)


class Projections(nn.Module):
    """The per-token layers of a token mixer alone (qkv Linear, LePE, output Linear).

    Subtracted from a mixer's FLOPs, it leaves the token-mixing part (routing + attention),
    whose exponent the asymptotic claims are about; at practical sizes the linear projections
    (8 C^2 FLOPs per token) dominate BRA's total.
    """

    dim: int
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.dim
        qkv = dense(3 * c, "qkv", jnp.float32, jnp.float32, use_bias=self.qkv_bias)(x)  # (N, H, W, 3C)
        out = qkv[..., 2 * c :] + DepthwiseConv2d(5, impl="conv", name="lepe")(qkv[..., c : 2 * c])
        return dense(c, "wo", jnp.float32, jnp.float32)(out)


def bra(dim: int, heads: int, n_win: int, topk: int) -> BiLevelRoutingAttention:
    """BiFormer's BRA (LePE 5x5, identity kv) computed by the routed `gather` implementation."""
    settings = RoutingSettings(
        num_heads=heads, n_win=n_win, topk=topk, side_dwconv=5, attn_impl="gather", dwconv_impl="conv"
    )
    return BiLevelRoutingAttention(dim=dim, routing=settings)


def build(series: str, side: int, *, dim: int, topk: int, window: int) -> tuple[nn.Module, int]:
    """(token mixer, n_win) of one series on a side x side token map."""
    heads = max(1, dim // 32)
    if series == "global":
        return AttentionLePE(dim=dim, num_heads=heads, dwconv_impl="conv"), 1
    if series == "window":
        return WindowAttention(dim=dim, num_heads=heads, n_win=side // window), side // window
    if series in ("bra_scaled", "bra_nwin7"):
        n_win = round(side ** (2 / 3)) if series == "bra_scaled" else 7
        mixer = bra(dim, heads, n_win, min(topk, n_win * n_win))
        return mixer, n_win
    raise ValueError(f"unknown series {series!r}; use one of {sorted(PAPER_EXPONENTS)}.")


def default_sides(series: str, window: int) -> list[int]:
    if series == "bra_scaled":
        return [m**3 for m in (2, 3, 4, 5, 6)]  # n_win = m^2 divides m^3; regions of m x m tokens
    if series == "window":
        return [window * k for k in (2, 4, 8, 16)]
    return [7 * k for k in (2, 4, 8, 16)]  # n_win 7 divides; global uses the same sizes


def measure(module: nn.Module, side: int, dim: int, *, timed: bool = False) -> dict[str, float]:
    """FLOPs and compiled bytes of one forward pass on a (1, side, side, dim) map (time if asked)."""
    x = jax.ShapeDtypeStruct((1, side, side, dim), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    compiled = jax.jit(module.apply).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    out = {
        "tokens": side * side,
        "flops": float(cost["flops"]),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
    }
    if timed:
        real_vars = jax.jit(module.init)(jax.random.key(0), jnp.zeros(x.shape, x.dtype))
        xs = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
        jax.block_until_ready(compiled(real_vars, xs))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(real_vars, xs))
            times.append(time.perf_counter() - t0)
        out["ms"] = 1e3 * float(np.median(times))
    return out


def run_series(series: str, sides: Sequence[int], *, dim: int, topk: int, window: int, timed: bool) -> list[dict]:
    rows = []
    for side in sides:
        module, n_win = build(series, side, dim=dim, topk=topk, window=window)
        row = {"series": series, "side": side, "n_win": n_win, **measure(module, side, dim, timed=timed)}
        linear = measure(Projections(dim, qkv_bias=series != "global"), side, dim)["flops"]
        row["mixing_flops"] = row["flops"] - linear
        rows.append(row)
        extra = f", {row['ms']:.1f} ms" if "ms" in row else ""
        print(
            f"{series:>10}  {side:>4}x{side:<4} tokens {row['tokens']:>6}  n_win {n_win:>3}  "
            f"{row['flops'] / 1e9:9.3f} GFLOP (mixing {row['mixing_flops'] / 1e9:8.3f})  "
            f"temp {row['temp_bytes'] / 2**20:9.1f} MiB{extra}",
            flush=True,
        )
    return rows


def exponents(rows: Sequence[dict]) -> dict[str, float]:
    tokens, cost, mixing = [r["tokens"] for r in rows], [r["flops"] for r in rows], [r["mixing_flops"] for r in rows]
    return {
        "fit": fit_exponent(tokens, cost),
        "last": fit_exponent(tokens[-2:], cost[-2:]),
        "mixing_fit": fit_exponent(tokens, mixing),
        "mixing_last": fit_exponent(tokens[-2:], mixing[-2:]),
    }


def nwin_sweep(side: int, n_wins: Sequence[int], *, dim: int, topk: int) -> list[dict]:
    """BRA's FLOPs on one side x side map for each region partition n_win (which must divide side)."""
    rows = []
    for n_win in n_wins:
        if side % n_win:
            raise ValueError(f"n_win={n_win} does not divide the {side}x{side} map; choose divisors of {side}.")
        mixer = bra(dim, max(1, dim // 32), n_win, min(topk, n_win * n_win))
        row = {"side": side, "n_win": n_win, **measure(mixer, side, dim)}
        rows.append(row)
        print(f"  n_win {n_win:>3} on {side}x{side}: {row['flops'] / 1e9:8.3f} GFLOP", flush=True)
    return rows


def plot(results: dict[str, list[dict]], fits: dict[str, dict], sweep: list[dict], out: str, dim: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for series, rows in results.items():
        t = np.array([r["tokens"] for r in rows], np.float64)
        f = fits[series]
        label = f"{series}: N^{f['fit']:.2f}, mixing N^{f['mixing_fit']:.2f} (paper {PAPER_EXPONENTS[series]:.2f})"
        (line,) = axes[0].loglog(t, [r["flops"] for r in rows], "o-", label=label)
        axes[0].loglog(t, [r["mixing_flops"] for r in rows], "x:", color=line.get_color(), alpha=0.7)
        axes[1].loglog(t, [max(r["temp_bytes"], 1) for r in rows], "o-", label=series)
    if sweep:
        axes[2].plot([r["n_win"] for r in sweep], [r["flops"] / 1e9 for r in sweep], "o-")
        axes[2].set_xscale("log", base=2)
        axes[2].set_yscale("log")
        side = sweep[0]["side"]
        axes[2].set(xlabel="n_win (regions per side)", ylabel="GFLOPs", title=f"BRA on {side}x{side} tokens vs n_win")
    else:
        axes[2].axis("off")
    ref = np.array([min(r["tokens"] for rows in results.values() for r in rows), max(
        r["tokens"] for rows in results.values() for r in rows)], np.float64)  # fmt: skip
    base = min(r["flops"] for rows in results.values() for r in rows)
    for k, style in ((1.0, ":"), (4 / 3, "--"), (2.0, "-.")):
        axes[0].loglog(ref, base * (ref / ref[0]) ** k, "k" + style, alpha=0.35, lw=1, label=f"slope {k:.2f}")
    title = f"forward FLOPs, width {dim} (x: mixing part)"
    axes[0].set(xlabel="tokens (H x W)", ylabel="FLOPs (XLA cost analysis)", title=title)
    axes[1].set(xlabel="tokens (H x W)", ylabel="compiled temp bytes", title="compiled temporary memory")
    for ax in axes[:2]:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, runner: Callable = run_series) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", default="global,window,bra_scaled,bra_nwin7")
    p.add_argument("--sides", default="", help="token-map sides for every series (default: per series)")
    p.add_argument("--dim", type=int, default=64, help="width of every token mixer (BiFormer stage 1: 64)")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--window", type=int, default=7, help="window side in tokens (series 'window')")
    p.add_argument("--nwin_side", type=int, default=112, help="map side of the n_win sweep (0: none)")
    p.add_argument("--nwins", default="2,4,7,8,14,16,28,56", help="the n_win values of that sweep")
    p.add_argument("--time", action="store_true", help="also run each compiled forward and report its time")
    p.add_argument("--out", default="complexity.png", help="the log-log plot (PNG)")
    args = p.parse_args(argv)
    results, fits = {}, {}
    for series in args.series.split(","):
        sides = [int(s) for s in args.sides.split(",")] if args.sides else default_sides(series, args.window)
        results[series] = runner(series, sides, dim=args.dim, topk=args.topk, window=args.window, timed=args.time)
        fits[series] = exponents(results[series])
    sweep = []
    if args.nwin_side:
        print(f"BRA (topk {args.topk}) on a {args.nwin_side}x{args.nwin_side} map against n_win:")
        sweep = nwin_sweep(args.nwin_side, [int(v) for v in args.nwins.split(",")], dim=args.dim, topk=args.topk)
    print(
        "\n| series | tokens | exponent: all points | last two | mixing part: all points | last two | paper |"
        "\n|---|---|---|---|---|---|---|"
    )
    for series, fit in fits.items():
        t = [r["tokens"] for r in results[series]]
        print(
            f"| {series} | {t[0]}-{t[-1]} | {fit['fit']:.3f} | {fit['last']:.3f} | {fit['mixing_fit']:.3f} | "
            f"{fit['mixing_last']:.3f} | {PAPER_EXPONENTS[series]:.3f} |"
        )
    plot(results, fits, sweep, args.out, args.dim)
    print(f"wrote {args.out}")
    summary = {"exponents": fits, "paper": PAPER_EXPONENTS, "results": results, "nwin_sweep": sweep, "dim": args.dim}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
