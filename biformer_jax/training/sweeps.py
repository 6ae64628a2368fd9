"""Config sweeps: grids of overrides, one workdir per run, and a summary table.

A sweep file defines `get_sweep(h)` returning a list of override dicts, built with the helpers
of `h` (this module):

    def get_sweep(h):
        return h.product([h.sweep("optim.lr", [1e-3, 2e-3]), h.sweep("seed", [0, 1])])

`h.sweep(name, values)` varies one field, `h.product([...])` takes every combination,
`h.zipit([...])` pairs lists element-wise, `h.fixed(name, value)` sets a field in every run.
Names are config paths (a leading "config." is accepted). Each run trains in
ROOT/<name>, its directory named after its overrides ("optim.lr=0.001,seed=0"), so re-running
the sweep resumes unfinished runs and skips finished ones; the summary (ROOT/summary.md and
ROOT/summary.csv) lists every run's final and best eval metrics, read from its metrics.jsonl.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from biformer_jax.training import metrics as metrics_lib

Point = dict[str, Any]


def sweep(name: str, values: Sequence[Any]) -> list[Point]:
    name = name.removeprefix("config.")
    return [{name: v} for v in values]


def fixed(name: str, value: Any) -> list[Point]:
    return sweep(name, [value])


def product(sweeps: Sequence[list[Point]]) -> list[Point]:
    return [{k: v for point in combo for k, v in point.items()} for combo in itertools.product(*sweeps)]


def zipit(sweeps: Sequence[list[Point]]) -> list[Point]:
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(f"zipit needs sweeps of equal length, got lengths {sorted(lengths)}.")
    return [{k: v for point in combo for k, v in point.items()} for combo in zip(*sweeps)]


def load_sweep(path: str | os.PathLike) -> list[Point]:
    """The override dicts of a sweep file's `get_sweep(h)`."""
    spec = importlib.util.spec_from_file_location("biformer_sweep", os.fspath(path))
    if spec is None or spec.loader is None or not os.path.exists(path):
        raise FileNotFoundError(f"No sweep file at {path}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} must define get_sweep(h) returning a list of override dicts.")
    import biformer_jax.training.sweeps as h

    points = list(module.get_sweep(h))
    if not points:
        raise ValueError(f"{path}: get_sweep returned no runs.")
    return points


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "x".join(_format_value(v) for v in value)
    return str(value)


def run_name(point: Mapping[str, Any]) -> str:
    """'optim.lr=0.001,seed=0': the overrides, sorted, safe as a directory name."""
    text = ",".join(f"{k}={_format_value(v)}" for k, v in sorted(point.items())) or "base"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def apply_overrides(config: ml_collections.ConfigDict, point: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with the overrides set; an unknown field fails, naming it."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.lock()
    for name, value in point.items():
        node = config
        *parents, leaf = name.split(".")
        for part in parents:
            if part not in node:
                raise KeyError(f"Sweep override {name!r}: the config has no field {part!r}.")
            node = node[part]
        if leaf not in node:
            raise KeyError(f"Sweep override {name!r}: the config has no field {leaf!r}.")
        node[leaf] = value
    return config


def run_summary(workdir: str) -> dict[str, Any]:
    """The last eval metrics of a run, and its best eval/top1, from its metrics.jsonl."""
    records = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))
    evals = {step: {k: v for k, v in r.items() if k.startswith("eval")} for step, r in records.items()}
    evals = {step: r for step, r in evals.items() if r}
    if not evals:
        return {}
    last = max(evals)
    out: dict[str, Any] = {"step": last, **evals[last]}
    top1 = [r["eval/top1"] for r in evals.values() if isinstance(r.get("eval/top1"), float)]
    if top1:
        out["best eval/top1"] = max(top1)
    return out


def write_summary(root: str, rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """ROOT/summary.md and ROOT/summary.csv, one row per run; returns their paths."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    csv_path, md_path = os.path.join(root, "summary.csv"), os.path.join(root, "summary.md")

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))

    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    with open(md_path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md_path + ".tmp", md_path)
    return md_path, csv_path


def run_sweep(
    config: ml_collections.ConfigDict,
    points: Sequence[Point],
    root: str,
    train_fn: Callable[[ml_collections.ConfigDict, str], Any],
) -> list[dict[str, Any]]:
    """Trains every point in turn (a failed run is recorded and the sweep goes on)."""
    configs = [(run_name(p), p, apply_overrides(config, p)) for p in points]  # every override checked first
    names = [name for name, _, _ in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"Two sweep points give the same run name: {names}.")
    os.makedirs(root, exist_ok=True)
    rows = []
    for name, point, run_config in configs:
        workdir = os.path.join(root, name)
        status = "ok"
        try:
            train_fn(run_config, workdir)
        except Exception as e:  # noqa: BLE001  (one failed run must not lose the others)
            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        rows.append({"run": name, **point, **run_summary(workdir), "status": status})
        if jax.process_index() == 0:
            write_summary(root, rows)
    return rows
