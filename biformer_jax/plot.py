"""Training curves: `python -m biformer_jax.plot WORKDIR [WORKDIR ...] [--out=curves.png]`.

Reads each run's `metrics.jsonl` (written by the trainer, one JSON object per logged step) and
draws train loss, learning rate and eval top-1 / mIoU against the step, every run overlaid.
A WORKDIR (local, gs:// or s3://) is a train.py workdir (holding metrics.jsonl) or a sweep's
workdir (sweep.py --workdir: one run per subdirectory, each named after its overrides, e.g.
`optim.lr=0.001,seed=0`); runs are labelled by those overrides, or by their directory name.
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)

from biformer_jax.storage import as_path, write_atomically  # noqa: E402
from biformer_jax.training import metrics as metrics_lib  # noqa: E402

# (metric key, panel title); keys are matched case-insensitively, and for mIoU also any
# `eval*/miou*` spelling a segmentation trainer may write.
DEFAULT_METRICS = (
    ("train/loss", "train loss"),
    ("train/learning_rate", "learning rate"),
    ("eval/top1", "eval top-1"),
    ("eval/miou", "eval mIoU"),
)


def find_runs(workdirs: Sequence[str]) -> list[tuple[str, str]]:
    """(label, metrics.jsonl path) of every run under the given workdirs (local, gs://, s3://), in order."""
    runs: list[tuple[str, str]] = []
    for workdir in workdirs:
        root = as_path(workdir)
        if not root.is_dir():
            raise FileNotFoundError(f"{workdir} is not a directory; pass train.py or sweep.py workdirs.")
        own = root / metrics_lib.METRICS_FILE
        if own.exists():
            runs.append((root.name, os.fspath(own)))
            continue
        subruns = sorted(p.name for p in root.iterdir() if (p / metrics_lib.METRICS_FILE).exists())
        if not subruns:
            raise FileNotFoundError(
                f"{workdir} has no {metrics_lib.METRICS_FILE}, nor any subdirectory with one: it is "
                "not a train.py workdir or a sweep.py workdir (has the run logged a step yet?)."
            )
        prefix = root.name if len(workdirs) > 1 else ""
        for name in subruns:
            label = f"{prefix}: {name}" if prefix else name
            runs.append((label, os.fspath(root / name / metrics_lib.METRICS_FILE)))
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):  # two workdirs with the same basename: use full paths
        runs = [(os.fspath(epath.Path(path).parent), path) for _, path in runs]
    return runs


def _value(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None  # "nan"/"inf" strings (metrics.to_python), lists, missing


def series(records: dict[int, dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step; key matched case-insensitively."""
    steps, values = [], []
    for step in sorted(records):
        for k, v in records[step].items():
            if k.lower() == key.lower() and _value(v) is not None:
                steps.append(step)
                values.append(_value(v))
                break
    return steps, values


def _resolve_key(all_keys: set[str], key: str) -> str | None:
    lowered = {k.lower(): k for k in all_keys}
    if key.lower() in lowered:
        return lowered[key.lower()]
    if key.lower() == "eval/miou":
        for k in sorted(all_keys):
            if k.lower().startswith("eval") and "miou" in k.lower():
                return k
    return None


def plot_runs(runs: Sequence[tuple[str, str]], metrics: Sequence[tuple[str, str]] = DEFAULT_METRICS):
    """A matplotlib Figure with one panel per metric present in any run, every run overlaid.

    Returns (figure, {panel title: metric key}). Raises ValueError when no run logged any of them.
    """
    loaded = [(label, metrics_lib.read_jsonl(path)) for label, path in runs]
    all_keys = {k for _, records in loaded for r in records.values() for k in r if k != "step"}
    panels = [(title, _resolve_key(all_keys, key)) for key, title in metrics]
    panels = [(title, key) for title, key in panels if key is not None]
    if not panels:
        wanted = ", ".join(key for key, _ in metrics)
        raise ValueError(f"None of the runs logged {wanted}; they logged: {', '.join(sorted(all_keys)) or 'nothing'}.")
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, key) in zip(axes.flat, panels):
        for i, (label, records) in enumerate(loaded):
            steps, values = series(records, key)
            if steps:
                marker = "o" if len(steps) <= 20 else None
                ax.plot(steps, values, label=label, color=colors[i % len(colors)], marker=marker, markersize=3)
        ax.set_title(f"{title} ({key})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.endswith("learning_rate"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:  # the legend of the panel with the most runs
        h, lab = ax.get_legend_handles_labels()
        if len(lab) > len(labels):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    return fig, {title: key for title, key in panels}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m biformer_jax.plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="train.py workdirs and/or sweep.py workdirs")
    parser.add_argument("--out", default=None, help="PNG to write (default: FIRST_WORKDIR/curves.png)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join(args.workdirs[0], "curves.png")
    try:
        runs = find_runs(args.workdirs)
        fig, panels = plot_runs(runs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_figure(fig, out)
    print(f"wrote {out}: {len(runs)} run(s), panels {', '.join(panels.values())}")
    return 0


def save_figure(fig, out: str, dpi: int = 110) -> None:
    """Writes the figure as PNG (local, gs://, s3://) through a temporary file: never a half file."""
    png = io.BytesIO()
    fig.savefig(png, dpi=dpi, format="png", bbox_inches="tight")
    plt.close(fig)
    as_path(out).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, png.getvalue())


if __name__ == "__main__":
    sys.exit(main())
