"""What one routed attention does for one query: its region's routes and its token attention.

Read from a forward pass that captures, only when asked (`capture_intermediates` restricted to
the chosen block's attention modules), the outputs the attention computes anyway: its q / kv
projections and its router's (weights, region indices), which are also the routes the model
records (`models.collect_routes`). The attention probabilities of the chosen query are then
recomputed from those tensors exactly as `ops.routed_attention` computes them (the tests check
the recomputed output against the module's). The model's code is untouched, so its normal
forward pass compiles exactly as before.

For DeBiFormer's deformable attention (attn2 of a block) the routed queries are the agents,
tokens sampled at deformed points: the query's region is a region of the agent grid, its
agents' deformed sampling points are returned, and the heatmap is their attention (mean over
agents and heads) over the routed regions' tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from biformer_jax.models.deformable import DeBiLevelRoutingAttention, reference_points
from biformer_jax.models.routing import BiLevelRoutingAttention, to_regions
from biformer_jax.ops.heads import split_heads
from biformer_jax.visualize.inputs import block_name

ROUTED = (BiLevelRoutingAttention, DeBiLevelRoutingAttention)


@dataclasses.dataclass
class QueryRoutes:
    """One query in one routed attention. Token maps are the padded stage map (H, W)."""

    module: str  # e.g. "stages_2_1/attn"
    kind: str  # "bra" | "deformable"
    stride: int  # input pixels per stage token
    n_win: int
    map_hw: tuple[int, int]  # the stage map (tokens), before padding to the region grid
    padded_hw: tuple[int, int]  # after padding: n_win divides both
    query: tuple[int, int]  # (y, x) input pixel
    token: tuple[int, int]  # (y, x) stage token
    region: int  # the query's region, row-major
    routes: np.ndarray  # (k,) routed regions in the router's order (descending score)
    weights: np.ndarray  # (k,) softmax of the routing scores
    heads: np.ndarray  # (m, H, W) attention of the query (mean over agents for deformable)
    points: Optional[np.ndarray] = None  # (g, a, 2) deformed points (y, x) in input pixels (deformable)

    @property
    def attention(self) -> np.ndarray:
        """(H, W) the mean over heads: sums to 1 over the routed regions' tokens, 0 elsewhere."""
        return self.heads.mean(axis=0)

    @property
    def region_hw(self) -> tuple[int, int]:
        return self.padded_hw[0] // self.n_win, self.padded_hw[1] // self.n_win


def routed_modules(model, variables, x: jax.Array, stage: int, block: int) -> tuple[str, dict[str, nn.Module]]:
    """(block name, {attention name: the module instance}) of the routed attentions of one block."""
    name = block_name(variables, stage, block)
    found: dict[str, nn.Module] = {}

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, ROUTED) and m.scope is not None and len(m.scope.path) == 2 and m.scope.path[0] == name:
            found[m.scope.path[1]] = m
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    if not found:
        raise ValueError(
            f"Block {name} (stage {stage}) has no routed attention: its stage does not route (topk <= 0, e.g. "
            "BiFormer's global-attention stage 3); choose a stage with topk > 0 (--stage)."
        )
    return name, dict(sorted(found.items()))


def capture(model, variables, x: jax.Array, block: str) -> dict[str, Any]:
    """The outputs of the block's attention modules and their children (one forward pass)."""

    def wanted(mdl: nn.Module, method: str) -> bool:
        path = mdl.scope.path if mdl.scope is not None else ()
        return method == "__call__" and len(path) >= 2 and path[0] == block and path[1].startswith("attn")

    def run(v, x):
        _, state = model.apply(v, x, train=False, capture_intermediates=wanted, mutable=["intermediates"])
        return state["intermediates"][block]

    return jax.jit(run)(variables, x)


def _out(tree: dict[str, Any], *path: str):
    for key in path:
        tree = tree[key]
    return tree["__call__"][0]


def query_probs(q_tok, kv_regions, routes, weights, num_heads: int, scale: float, soft: bool) -> jax.Array:
    """Attention of queries over the tokens of their routed regions, as `routed_attention` computes it.

    q_tok: (Q, Cqk) queries of one region; kv_regions: (P, T, Cqk + Cv); routes, weights: (k,).
    Returns (Q, m, k, T) probabilities (sum 1 over (k, T) per query and head).
    """
    cqk = q_tok.shape[-1]
    k, t = routes.shape[0], kv_regions.shape[1]
    qh = split_heads((q_tok * scale)[None, None], num_heads)[0, 0]  # (m, Q, c)
    kh = split_heads(kv_regions[None, ..., :cqk], num_heads)[0]  # (P, m, T, c)
    k_sel = kh[routes]  # (k, m, T, c)
    if soft:  # the gathered keys are scaled by their region's routing weight
        k_sel = k_sel * weights.astype(k_sel.dtype)[:, None, None, None]
    logits = jnp.einsum("mqc,kmtc->qmkt", qh, k_sel, preferred_element_type=jnp.float32)  # (Q, m, k, T)
    probs = jax.nn.softmax(logits.reshape(*logits.shape[:2], k * t), axis=-1)  # (Q, m, k*T)
    return probs.reshape(*logits.shape)  # (Q, m, k, T)


def _scatter(probs: jax.Array, routes: np.ndarray, n_win: int, padded_hw: tuple[int, int]) -> np.ndarray:
    """(m, k, h*w) probabilities of routed regions -> (m, H, W) on the padded token map."""
    m = probs.shape[0]
    hh, ww = padded_hw
    h, w = hh // n_win, ww // n_win
    out = np.zeros((m, n_win * n_win, h, w), np.float64)
    out[:, np.asarray(routes)] = np.asarray(probs, np.float64).reshape(m, len(routes), h, w)
    out = out.reshape(m, n_win, n_win, h, w).transpose(0, 1, 3, 2, 4)  # (m, j, h, i, w)
    return out.reshape(m, hh, ww)


def _check_kv_identity(mod: nn.Module, where: str) -> None:
    mode = mod.routing.kv_downsample_mode
    if mode != "identity":
        raise ValueError(
            f"{where} pools its keys (kv_downsample_mode={mode!r}), so its attention is "
            "over pooled cells, not tokens; the routes overlay draws token attention for "
            "kv_downsample_mode='identity' (every official BiFormer/DeBiFormer variant)."
        )


def query_routes(
    model, variables, x: jax.Array, stage: int, block: int, queries: list[tuple[int, int]]
) -> list[list[QueryRoutes]]:
    """For every query pixel (y, x) of the (1, H, W, 3) image x: one QueryRoutes per routed attention
    of the block (BiFormer: attn; DeBiFormer: attn1 when it routes, and attn2)."""
    height, width = x.shape[1:3]
    for qy, qx in queries:
        if not (0 <= qy < height and 0 <= qx < width):
            raise ValueError(
                f"Query (y={qy}, x={qx}) is outside the {height}x{width} image; give --query=y,x with "
                f"0 <= y < {height} and 0 <= x < {width} (in pixels of the resized input)."
            )
    name, mods = routed_modules(model, variables, x, stage, block)
    inter = capture(model, variables, x, name)
    stride = 4 * 2**stage
    out = []
    for qy, qx in queries:
        row = []
        for attn, mod in mods.items():
            _check_kv_identity(mod, f"{name}/{attn}")
            if isinstance(mod, DeBiLevelRoutingAttention):
                row.append(_deformable(mod, inter[attn], f"{name}/{attn}", stride, (qy, qx)))
            else:
                row.append(_bra(mod, inter[attn], f"{name}/{attn}", stride, (qy, qx)))
        out.append(row)
    return out


def _locate(query, stride, map_hw, padded_hw, n_win) -> tuple[tuple[int, int], int]:
    ty = min(query[0] // stride, map_hw[0] - 1)
    tx = min(query[1] // stride, map_hw[1] - 1)
    h, w = padded_hw[0] // n_win, padded_hw[1] // n_win
    return (ty, tx), (ty // h) * n_win + tx // w


def _bra(mod, inter, where, stride, query) -> QueryRoutes:
    q, kv = _out(inter, "qkv")  # (1, H, W, Cqk), (1, H, W, Cqk + C): padded
    r_weight, r_idx = _out(inter, "router")  # (1, P, k) each
    map_hw = tuple(_out(inter).shape[1:3])
    r = mod.routing
    padded_hw, p = tuple(q.shape[1:3]), r.n_win
    token, region = _locate(query, stride, map_hw, padded_hw, p)
    h, w = padded_hw[0] // p, padded_hw[1] // p
    q_reg = to_regions(q, p)[0, region]  # (h, w, Cqk)
    kv_reg = to_regions(kv, p)[0].reshape(p * p, h * w, -1)  # (P, h*w, Cqk + C)
    t = (token[0] % h) * w + token[1] % w
    routes, weights = np.asarray(r_idx[0, region]), np.asarray(r_weight[0, region])
    qk = r.qk_dim or mod.dim
    probs = query_probs(
        q_reg.reshape(h * w, -1)[t : t + 1], kv_reg, routes, weights, r.num_heads, r.qk_scale or qk**-0.5,
        r.soft_routing,
    )[0]  # fmt: skip  # (m, k, T)
    heads = _scatter(probs, routes, p, padded_hw)
    return QueryRoutes(where, "bra", stride, p, map_hw, padded_hw, query, token, region, routes, weights, heads)


def _deformable(mod, inter, where, stride, query) -> QueryRoutes:
    s = mod.resolved_settings()
    r = mod.routing
    g, p = s.n_groups, r.n_win
    q, kv = _out(inter, "qkv_conv")  # (1, H, W, C), (1, H, W, 2C): the padded map
    r_weight, r_idx = _out(inter, "router")  # (1, P, k) each
    agents_q = _out(inter, "proj_q")  # (1, Hg, Wg, C): queries of the agents, padded agent grid
    off = _out(inter, "conv_offset_q_3")  # (g, Hk, Wk, 1)
    map_hw = tuple(_out(inter).shape[1:3])
    padded_hw = tuple(q.shape[1:3])
    token, region = _locate(query, stride, map_hw, padded_hw, p)
    hg, wg = agents_q.shape[1:3]
    ah, aw = hg // p, wg // p  # agents per region
    kv_reg = to_regions(kv, p)[0]
    kv_reg = kv_reg.reshape(p * p, -1, kv_reg.shape[-1])  # (P, h*w, 2C)
    routes, weights = np.asarray(r_idx[0, region]), np.asarray(r_weight[0, region])
    q_agents = to_regions(agents_q, p)[0, region].reshape(ah * aw, -1)  # (a, C)
    scale = r.qk_scale or mod.dim**-0.5
    probs = query_probs(q_agents, kv_reg, routes, weights, r.num_heads, scale, r.soft_routing)  # (a, m, k, T)
    heads = _scatter(probs.mean(axis=0), routes, p, padded_hw)
    # The agents' points: the release's offsets + reference points, clamped, on the (padded) map.
    hk, wk = off.shape[1:3]
    pos = np.asarray(jnp.clip(off.astype(jnp.float32) + reference_points(hk, wk), -1.0, 1.0))  # (g, Hk, Wk, 2)
    ry, rx = divmod(region, p)
    ys, xs = np.arange(ry * ah, (ry + 1) * ah), np.arange(rx * aw, (rx + 1) * aw)
    ys, xs = ys[ys < hk], xs[xs < wk]  # agents on padding sit at the map centre: not drawn
    pts = pos[:, ys][:, :, xs].reshape(g, -1, 2)  # (g, a, 2) in [-1, 1] (y, x), align_corners
    scale_yx = np.array([padded_hw[0] - 1, padded_hw[1] - 1], np.float64) / 2.0
    pixels = ((pts + 1.0) * scale_yx + 0.5) * stride  # token centres in input pixels
    return QueryRoutes(
        where, "deformable", stride, p, map_hw, padded_hw, query, token, region, routes, weights, heads, pixels
    )
