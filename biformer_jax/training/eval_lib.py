"""Evaluation: one pass over the eval split (top-1, top-5, loss), and eval.py's checkpoint evaluation."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from etils import epath

from biformer_jax import data, storage
from biformer_jax.models.from_config import abstract_variables, model_from_config, model_meta
from biformer_jax.ops.pallas_dispatch import kernels_see_mesh
from biformer_jax.training import checkpoint, restore, sharding, steps

EVAL_RESULTS_FILE = "eval_results.json"


def make_eval_step(model, mesh, variable_shardings) -> Callable:
    return jax.jit(
        kernels_see_mesh(functools.partial(steps.eval_step, model=model), mesh),
        in_shardings=(variable_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def evaluate(
    eval_step: Callable,
    variables: Any,
    *,
    config,
    mesh,
    num_examples: int,
    desc: str = "eval",
) -> dict[str, float]:
    """{"top1", "top5", "loss"} over the eval split (or its first config.eval_steps batches)."""
    batch_size = config.eval_batch_size
    sharding.check_batch_size(batch_size, mesh, "config.eval_batch_size")
    total = math.ceil(num_examples / batch_size)
    if config.eval_steps > 0:
        total = min(total, config.eval_steps)
    it = data.eval_iterator(
        config.data, global_batch_size=batch_size, process_index=jax.process_index(), process_count=jax.process_count()
    )
    collected = None
    report_every = max(1, total // 10)
    for i, local in enumerate(it):
        if i >= total:
            break
        m = eval_step(variables, sharding.global_batch(local, mesh))
        collected = m if collected is None else collected.merge(m)
        if (i + 1) % report_every == 0 or i + 1 == total:
            logging.info("%s: %d/%d batches", desc, i + 1, total)
    if collected is None:
        raise ValueError(f"The eval split of {config.data.name!r} yielded no batches.")
    return {k: float(v) for k, v in collected.compute().items()}


def write_results(path: str | os.PathLike, record: dict[str, Any]) -> epath.Path:
    """Writes `record` as JSON at `path` (gs://, s3:// or local; a directory gets eval_results.json).

    Written to a temporary sibling and renamed over `path` (a previous result is replaced), so `path`
    is never half-written. Raises OSError (or the filesystem's error) where it cannot write.
    """
    target = storage.as_path(path)
    if target.is_dir():
        target = target / EVAL_RESULTS_FILE
    return storage.write_atomically(target, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def evaluate_checkpoint(config, checkpoint_path: str) -> dict[str, Any]:
    """Top-1/top-5/loss of a checkpoint's weights (and of its EMA weights when it has them).

    Returns {"top1", "top5", "loss", "num_examples", "checkpoint", "step", "model"} plus "ema":
    {...} for train checkpoints with EMA; `write_results` saves it (eval.py prints it first). A
    checkpoint of another architecture than the config's raises ArchitectureMismatchError.
    """
    mesh = sharding.create_mesh(config.mesh)
    info = data.dataset_info(config.data)
    model = model_from_config(config, info.num_classes)
    ref = checkpoint.resolve(checkpoint_path)
    restore.check_architecture(ref, model_meta(config, info.num_classes), what="--checkpoint")
    abstract = abstract_variables(model, info.image_size)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding.fsdp_min_size)
    eval_step = make_eval_step(model, mesh, shardings)
    results: dict[str, Any] = {
        "checkpoint": os.fspath(ref.path),
        "step": ref.step,
        "model": config.model,
        "dataset": config.data.name,
        "num_examples": info.num_eval_examples,
    }
    variables = checkpoint.load_variables(ref, abstract=sharding.with_shardings(abstract, shardings))
    results.update(evaluate(eval_step, variables, config=config, mesh=mesh, num_examples=info.num_eval_examples))
    if ref.kind == "train" and checkpoint.has_item(ref, "ema_variables"):
        ema = checkpoint.load_variables(ref, ema=True, abstract=sharding.with_shardings(abstract, shardings))
        results["ema"] = evaluate(
            eval_step, ema, config=config, mesh=mesh, num_examples=info.num_eval_examples, desc="eval (EMA)"
        )
    return results
