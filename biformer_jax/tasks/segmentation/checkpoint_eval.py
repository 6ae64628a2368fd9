"""eval.py for segmentation configs: mIoU / mAcc / aAcc of a checkpoint, raw and EMA weights.

Prints mmseg's per-class table for each set of weights; returns (and eval.py prints as its last
line) {"mIoU", "mAcc", "aAcc" (fractions), "num_examples", "checkpoint", "step", "model",
"dataset", "eval_mode", "views"} plus "ema": {...} when the checkpoint holds EMA weights. eval.py
writes it (after printing it) with tasks.write_results, to a local, gs:// or s3:// checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from biformer_jax.data.segmentation import config as seg_config
from biformer_jax.data.segmentation import sources as seg_sources
from biformer_jax.models import from_config
from biformer_jax.tasks.segmentation import evaluate as seg_evaluate
from biformer_jax.tasks.segmentation import metrics as seg_metrics
from biformer_jax.training import loader


def load_model_and_variables(config, checkpoint_path: str):
    """(model, class names, ref, raw variables, EMA variables or None) of a segmentation checkpoint.

    A checkpoint of another architecture than the config's (model name, or model_kwargs such as
    topks, n_win, auto_pad, head settings) raises restore.ArchitectureMismatchError listing them.
    """
    names = seg_sources.read_class_names(config.data)  # ADE20K's need no dataset (predict on photos)
    model = from_config.model_from_config(config, len(names))
    loaded = loader.load(
        checkpoint_path,
        input_size=tuple(config.data.crop_size),
        expect=from_config.model_meta(config, len(names)),
        model=model,
        ema="also",
    )
    return model, names, loaded.ref, loaded.variables, loaded.ema_variables


def evaluate_checkpoint(config, checkpoint_path: str) -> dict[str, Any]:
    """Evaluates a checkpoint (see the module docstring); prints the per-class tables."""
    seg_config.validate_eval_config(config.eval)
    model, names, ref, variables, ema = load_model_and_variables(config, checkpoint_path)
    results: dict[str, Any] = {
        "checkpoint": os.fspath(ref.path),
        "step": ref.step,
        "model": config.model,
        "dataset": config.data.name,
        "eval_mode": config.eval.mode,
        "views": len(seg_config.eval_views(config.eval)),
    }
    for key, weights in (("", variables), ("ema", ema)):
        if weights is None:
            continue
        summary = seg_evaluate.evaluate(model, weights, config.data, config.eval, desc=f"eval {key}".strip())
        if jax.process_index() == 0:
            print(f"\n{'EMA weights' if key else 'Weights'} of {ref.path}:")
            print(seg_metrics.per_class_table(summary, names), flush=True)
        entry = {**seg_evaluate.scalars(summary), "num_examples": summary["num_examples"]}
        if key:
            results[key] = entry
        else:
            results.update(entry)
    return results  # eval.py prints it, then writes it (tasks.write_results: gs://, s3:// or local)
