"""Matplotlib figures (Agg) of the visualisations; every drawn element that carries a result has a
`gid` naming it (`route:<rank>:<region>`, `query_region:<region>`, `points:<group>`), so tests read
the figure back instead of trusting the code that drew it."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from biformer_jax.visualize.routes import QueryRoutes  # noqa: E402

ROUTE_COLOR = "#00e5ff"
QUERY_COLOR = "#ff3d00"


def draw_routes(ax, image: np.ndarray, qr: QueryRoutes, head: int | None = None) -> None:
    """The image, region grid, the query's region (filled), its routed regions (outlined, numbered
    1..k by routing score) and the query's attention over their tokens (heatmap, 0 not drawn)."""
    img_h, img_w = image.shape[:2]
    s, n = qr.stride, qr.n_win
    canvas_h, canvas_w = qr.padded_hw[0] * s, qr.padded_hw[1] * s  # the padded stage map in pixels
    rh, rw = canvas_h / n, canvas_w / n
    ax.imshow(image, extent=(0, img_w, img_h, 0), interpolation="bilinear")
    heat = qr.attention if head is None else qr.heads[head]
    ax.imshow(
        np.ma.masked_where(heat <= 0, heat),
        extent=(0, canvas_w, canvas_h, 0),
        cmap="inferno",
        alpha=0.65,
        interpolation="nearest",
        vmin=0.0,
        vmax=float(heat.max()) if heat.max() > 0 else 1.0,
    )
    for i in range(1, n):
        ax.axhline(i * rh, color="white", lw=0.6, alpha=0.7, gid="grid")
        ax.axvline(i * rw, color="white", lw=0.6, alpha=0.7, gid="grid")
    qy, qx = divmod(qr.region, n)
    ax.add_patch(
        Rectangle(
            (qx * rw, qy * rh),
            rw,
            rh,
            facecolor=QUERY_COLOR,
            alpha=0.18,
            edgecolor=QUERY_COLOR,
            lw=1.5,
            gid=f"query_region:{qr.region}",
        )  # fmt: skip
    )
    for rank, region in enumerate(qr.routes.tolist(), start=1):
        ry, rx = divmod(region, n)
        inset = 0.04 * min(rh, rw) * (1 + rank % 3)  # nested outlines stay visible
        ax.add_patch(
            Rectangle(
                (rx * rw + inset, ry * rh + inset),
                rw - 2 * inset,
                rh - 2 * inset,
                fill=False,
                edgecolor=ROUTE_COLOR,
                lw=1.8,
                gid=f"route:{rank}:{region}",
            )  # fmt: skip
        )
        label = dict(boxstyle="round,pad=0.15", fc=ROUTE_COLOR, ec="none")
        at = (rx * rw + 2 * inset, ry * rh + 2 * inset)
        ax.text(*at, str(rank), fontsize=8, ha="left", va="top", bbox=label, gid=f"route_label:{rank}:{region}")
    if qr.points is not None:
        markers = "o^sDv<>p"
        for g, pts in enumerate(qr.points):
            ax.scatter(pts[:, 1], pts[:, 0], s=14, marker=markers[g % len(markers)], c="#76ff03",
                       edgecolors="black", linewidths=0.4, gid=f"points:{g}")  # fmt: skip
    ax.plot([qr.query[1]], [qr.query[0]], marker="*", ms=13, color=QUERY_COLOR, mec="white", gid="query")
    ax.set_xlim(0, max(img_w, canvas_w))
    ax.set_ylim(max(img_h, canvas_h), 0)
    ax.set_xticks([])
    ax.set_yticks([])
    what = "agents' attention" if qr.kind == "deformable" else "attention"
    who = "mean over heads" if head is None else f"head {head}"
    ax.set_title(
        f"{qr.module}: query (y={qr.query[0]}, x={qr.query[1]})\nregion {qr.region} -> {qr.routes.tolist()}; "
        f"{what}, {who}",
        fontsize=7,
    )


def routes_figure(image: np.ndarray, results: Sequence[Sequence[QueryRoutes]], per_head: bool = False):
    """One row per query; one panel per routed attention of the block (per head with per_head)."""
    panels = [[(qr, h) for qr in row for h in (range(qr.heads.shape[0]) if per_head else [None])] for row in results]
    if all(len(row) == 1 for row in panels):  # one panel per query: side by side
        panels = [[row[0] for row in panels]]
    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.6 * rows), squeeze=False)
    for r, row in enumerate(panels):
        for c in range(cols):
            if c < len(row):
                draw_routes(axes[r, c], image, *row[c])
            else:
                axes[r, c].axis("off")
    fig.tight_layout()
    return fig


def overlay(ax, image: np.ndarray, heat: np.ndarray, title: str, cmap: str = "jet") -> None:
    extent = (0, image.shape[1], image.shape[0], 0)  # both layers on the same pixel grid
    ax.imshow(image, interpolation="bilinear", extent=extent)
    ax.imshow(heat, cmap=cmap, alpha=0.5, extent=extent, vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def gradcam_figure(image: np.ndarray, cams: Sequence[tuple[int, np.ndarray]], cls: int, label: str):
    """The image, then the Grad-CAM overlay of each (stage, cam)."""
    fig, axes = plt.subplots(1, len(cams) + 1, figsize=(3 * (len(cams) + 1), 3.4), squeeze=False)
    axes[0, 0].imshow(image, interpolation="bilinear")
    axes[0, 0].set_title(f"{label}\nclass {cls}", fontsize=8)
    axes[0, 0].axis("off")
    for ax, (stage, cam) in zip(axes[0, 1:], cams):
        overlay(ax, image, cam, f"Grad-CAM, stage {stage} output")
    fig.tight_layout()
    return fig


def erf_figure(maps: Sequence[tuple[str, np.ndarray, dict[float, float]]], stage: int, num_images: int):
    """One heatmap per model (each scaled to its own peak), the 20/50/90% mass fractions below."""
    fig, axes = plt.subplots(1, len(maps), figsize=(3.4 * len(maps), 3.8), squeeze=False)
    for ax, (label, heat, fractions) in zip(axes[0], maps):
        ax.imshow(heat / max(float(heat.max()), 1e-30), cmap="viridis", interpolation="nearest")
        text = ", ".join(f"{int(100 * t)}%: {100 * f:.1f}%" for t, f in fractions.items())
        ax.set_title(f"{label}\nERF stage {stage}, {num_images} images", fontsize=8)
        ax.set_xlabel(f"image share holding {text}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
