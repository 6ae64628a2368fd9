"""Classification evaluation: one pass over the eval split (top-1, top-5, loss), and eval.py's checkpoint evaluation.

The eval step is compiled once per evaluator through `host_memory.compile_for_inference` (the
compiler's freed memory goes back to the system, as in segmentation inference); every batch has
the same shape (the last one padded), so one executable serves the whole pass.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from biformer_jax import data
from biformer_jax.host_memory import compile_for_inference
from biformer_jax.models import from_config
from biformer_jax.models.from_config import model_from_config, model_meta
from biformer_jax.ops.pallas_dispatch import kernels_see_mesh
from biformer_jax.tasks.classification import steps
from biformer_jax.training import loader, sharding


class EvalStep:
    """`steps.eval_step` jitted over the mesh: (variables, global batch) -> EvalMetrics.

    Compiled on its first call through `compile_for_inference` and kept: every later call with
    the same shapes runs that executable.
    """

    def __init__(self, model, mesh, variable_shardings):
        self.jitted = jax.jit(
            kernels_see_mesh(functools.partial(steps.eval_step, model=model), mesh),
            in_shardings=(variable_shardings, sharding.batch_sharding(mesh)),
            out_shardings=sharding.replicated(mesh),
        )
        self._compiled: dict[Any, Any] = {}

    def __call__(self, variables, batch):
        key = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves((variables, batch)))
        if key not in self._compiled:
            self._compiled[key] = compile_for_inference(self.jitted, variables, batch)
        return self._compiled[key](variables, batch)


def make_eval_step(model, mesh, variable_shardings) -> Callable:
    return EvalStep(model, mesh, variable_shardings)


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


def evaluate_checkpoint(config, checkpoint_path: str) -> dict[str, Any]:
    """Top-1/top-5/loss of a checkpoint's weights (and of its EMA weights when it has them).

    Returns {"top1", "top5", "loss", "num_examples", "checkpoint", "step", "model"} plus "ema":
    {...} for train checkpoints with EMA; `tasks.write_results` saves it (eval.py prints it first). A
    checkpoint of another architecture than the config's raises ArchitectureMismatchError.
    """
    mesh = sharding.create_mesh(config.mesh)
    info = data.dataset_info(config.data)
    model = model_from_config(config, info.num_classes)
    abstract = from_config.abstract_variables(model, info.image_size)
    shardings = sharding.state_shardings(abstract, mesh, config.sharding.fsdp_min_size)
    loaded = loader.load(
        checkpoint_path,
        input_size=info.image_size,
        expect=model_meta(config, info.num_classes),
        model=model,
        ema="also",
        shardings=shardings,
    )
    ref = loaded.ref
    eval_step = make_eval_step(model, mesh, shardings)
    results: dict[str, Any] = {
        "checkpoint": os.fspath(ref.path),
        "step": ref.step,
        "model": config.model,
        "dataset": config.data.name,
        "num_examples": info.num_eval_examples,
    }
    results.update(evaluate(eval_step, loaded.variables, config=config, mesh=mesh, num_examples=info.num_eval_examples))
    if loaded.ema_variables is not None:
        results["ema"] = evaluate(
            eval_step,
            loaded.ema_variables,
            config=config,
            mesh=mesh,
            num_examples=info.num_eval_examples,
            desc="eval (EMA)",
        )
    return results
