"""The training run's metric writers: TensorBoard + logging + WORKDIR/metrics.jsonl.

Apart from metrics.py because clu's writers import TensorFlow (about 3 s here): only the trainer
needs them, and eval.py, predict.py, export, plot and visualize start without it.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

from clu import metric_writers
from etils import epath

from biformer_jax.training.metrics import METRICS_FILE, to_python


class JsonlWriter(metric_writers.MetricWriter):
    """Appends every scalar write to a JSON-lines file (one object per step)."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)  # gs://, s3:// or local
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        record = {"step": int(step), **{k: to_python(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
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


def create_writer(workdir: str | os.PathLike, *, process_index: int) -> metric_writers.MetricWriter:
    """TensorBoard + logging on process 0 (logging only elsewhere), plus metrics.jsonl on process 0."""
    writer = metric_writers.create_default_writer(
        os.fspath(workdir), just_logging=process_index > 0, asynchronous=False
    )
    if process_index > 0:
        return writer
    return metric_writers.MultiWriter([writer, JsonlWriter(epath.Path(workdir) / METRICS_FILE)])
