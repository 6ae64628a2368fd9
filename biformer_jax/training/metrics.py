"""Metric collections (clu), and WORKDIR/metrics.jsonl's name and reader (writers.py writes it).

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
from clu import metrics
from etils import epath

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


def to_python(value: Any) -> Any:
    """A metric value as JSON: a Python scalar (non-finite floats as "nan"/"inf" strings) or a list."""
    value = np.asarray(jax.device_get(value))
    if value.ndim == 0:
        value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # JSON has no NaN/inf; keep the line valid
        return value
    return value.tolist()


def read_jsonl(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """step -> merged metrics of every line for that step (later lines win)."""
    out: dict[int, dict[str, Any]] = {}
    path = epath.Path(path)
    if not path.exists():
        return out
    with path.open() as f:
        for line in f:
            line = line.strip()
            if line:
                record = json.loads(line)
                out.setdefault(int(record["step"]), {}).update(record)
    return out


def prefixed(computed: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(np.asarray(v)) for k, v in computed.items()}
