"""Metric collections (clu) and writers: TensorBoard + logging + WORKDIR/metrics.jsonl.

The collections are produced inside the jitted steps, merged on device by the loop and computed
on the host when logged. `metrics.jsonl` gets one JSON object per written step,
{"step": s, "<name>": value, ...}; it is only ever appended to, so a resumed run adds the steps
after its checkpoint again (readers keep the last line for a step, as `read_jsonl` does).
"""

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np
from clu import metric_writers, metrics

METRICS_FILE = "metrics.jsonl"


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    grad_norm: metrics.Average.from_output("grad_norm")
    param_norm: metrics.LastValue.from_output("param_norm")
    update_norm: metrics.Average.from_output("update_norm")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    nonfinite: metrics.Average.from_output("nonfinite")  # fraction of steps that were skipped


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")


def _to_python(value: Any) -> Any:
    value = np.asarray(jax.device_get(value))
    if value.ndim == 0:
        value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # JSON has no NaN/inf; keep the line valid
        return value
    return value.tolist()


class JsonlWriter(metric_writers.MetricWriter):
    """Appends every scalar write to a JSON-lines file (one object per step)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: _to_python(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def create_writer(workdir: str, *, process_index: int) -> metric_writers.MetricWriter:
    """TensorBoard + logging on process 0 (logging only elsewhere), plus metrics.jsonl on process 0."""
    writer = metric_writers.create_default_writer(workdir, just_logging=process_index > 0, asynchronous=False)
    if process_index > 0:
        return writer
    return metric_writers.MultiWriter([writer, JsonlWriter(os.path.join(workdir, METRICS_FILE))])


def read_jsonl(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """step -> merged metrics of every line for that step (later lines win)."""
    out: dict[int, dict[str, Any]] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                out.setdefault(int(record["step"]), {}).update(record)
    return out


def prefixed(computed: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(np.asarray(v)) for k, v in computed.items()}
