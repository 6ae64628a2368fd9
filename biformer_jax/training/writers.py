"""The training run's metric writers: logging + TensorBoard + WORKDIR/metrics.jsonl.

The TensorBoard event files are written here with TensorBoard's own protos and record format
(the `tensorboard` package, no TensorFlow): the scalars as `tf.summary.scalar` writes them
(float32 tensors, the scalars plugin), the hyperparameters as the hparams plugin's summary.
clu's writers import TensorFlow (about 5 s on a 2-core machine, every train.py start); a gs://
workdir still goes through etils.epath, which reaches GCS through TensorFlow's filesystem.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util

from biformer_jax.training.metrics import METRICS_FILE, to_python

_EVENT_FILES = itertools.count()  # a process's event files are numbered, as TensorFlow's writer does


class MetricWriter:
    """What the trainer writes: scalars per step, the hyperparameters once."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class LoggingWriter(MetricWriter):
    """INFO log lines `[step] name=value, ...` (names sorted, floats to 6 significant digits)."""

    def write_scalars(self, step, scalars):
        values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())]
        logging.info("[%d] %s", step, ", ".join(values))

    def write_hparams(self, hparams):
        logging.info("[Hyperparameters] %s", dict(hparams))

    def flush(self):
        logging.flush()


class JsonlWriter(MetricWriter):
    """Appends every scalar write to a JSON-lines file (one object per step)."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)  # gs://, s3:// or local
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write_scalars(self, step, scalars):
        record = {"step": int(step), **{k: to_python(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class TensorBoardWriter(MetricWriter):
    """One TensorBoard event file in `logdir` (local or gs://), new for each writer."""

    def __init__(self, logdir: str | os.PathLike):
        directory = epath.Path(logdir)
        directory.mkdir(parents=True, exist_ok=True)
        host, pid, n = socket.gethostname(), os.getpid(), next(_EVENT_FILES)
        self.path = directory / f"events.out.tfevents.{int(time.time()):010d}.{host}.{pid}.{n}.v2"
        self._file = contextlib.ExitStack()  # a gs:// path opens as a context manager
        self._records = RecordWriter(self._file.enter_context(self.path.open("wb")))
        self._closed = False
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def write_scalars(self, step, scalars):
        meta = scalar_metadata.create_summary_metadata(display_name=None, description=None)
        values = [
            summary_pb2.Summary.Value(tag=k, metadata=meta, tensor=tensor_util.make_tensor_proto(np.float32(v)))
            for k, v in scalars.items()
        ]
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def write_hparams(self, hparams):
        self._write(event_pb2.Event(wall_time=time.time(), step=0, summary=hparams_summary.hparams_pb(dict(hparams))))

    def flush(self):
        if not self._closed:
            self._records.flush()

    def close(self):
        if not self._closed:
            self._closed = True
            self._file.close()


class MultiWriter(MetricWriter):
    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_hparams(self, hparams):
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


def create_writer(workdir: str | os.PathLike, *, process_index: int) -> MetricWriter:
    """Logging everywhere; on process 0 also TensorBoard and metrics.jsonl in `workdir`."""
    if process_index > 0:
        return LoggingWriter()
    workdir = epath.Path(workdir)
    return MultiWriter([LoggingWriter(), TensorBoardWriter(workdir), JsonlWriter(workdir / METRICS_FILE)])
