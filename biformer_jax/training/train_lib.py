"""The training loop: `train_and_evaluate(config, workdir, task)`, one loop for every task.

The task (`biformer_jax.tasks.get(config)`, handed in by train.py / sweep.py) supplies the data,
the schedule, the optimiser, the train step, the evaluation and init_from (tasks/base.py); this
module never asks which task it runs.

Setup, in order: mesh -> dataset info -> model, optimiser, schedule -> abstract state
(`jax.eval_shape`) -> shardings -> initial state, created or restored already sharded. The
initial state comes from, in this order (the first that exists wins): the workdir's own latest
checkpoint (preemption / restart), `config.resume` (another run's train checkpoint),
`config.init_from` (weights only, as the task merges them: `Task.init_from`), else a fresh
initialisation from `config.seed`.

The loop runs the task's jitted train step (state donated) on global batches built from this
host's slice, logs train metrics every `log_every_steps`, evaluates the raw and EMA weights every
`eval_every_steps`, and saves asynchronously every `checkpoint.every_steps` and at the end. A
non-finite loss stops the run (`NonFiniteLossError`) before anything bad is saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import parameter_overview

from biformer_jax.models import block_layout, from_config
from biformer_jax.ops.pallas_dispatch import kernels_see_mesh
from biformer_jax.training import checkpoint, checkpoint_manager, preemption, progress, restore, sharding, writers
from biformer_jax.training import metrics as metrics_lib
from biformer_jax.training.train_state import TrainState, init_train_state


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the run stopped with its last good checkpoint kept."""


def _every(value: int, default: int) -> int:
    return value if value > 0 else default


def _init_compiler_options() -> dict[str, Any]:
    # XLA:CPU spends an init's compile time LLVM-optimising one fusion per random initializer
    # (~30 s for the micro model, 3x less unoptimised); the init runs once, so skip that work.
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}


def initial_state(
    config,
    manager,
    init_fn,
    abstract: TrainState,
    shardings: TrainState,
    *,
    task=None,
    meta: dict[str, Any] | None = None,
) -> TrainState:
    """The run's first state, by the resume order: workdir, config.resume, config.init_from, scratch.

    `meta` is the config's model record (`Setup.meta`; computed by `task` when not given). Every
    source is checked against it first: a checkpoint of another architecture stops the run with
    the list of differences (`restore.ArchitectureMismatchError`). `task` (tasks.base.Task) merges
    config.init_from's weights; it is needed only when config.init_from is set or `meta` is not given.
    """
    if meta is None:
        meta = _record(config, task, task.dataset_info(config))
    restore.check_own_checkpoint(config, manager, meta)  # before anything is read or compiled
    abstract_sharded = sharding.with_shardings(abstract, shardings)
    state = restore.restore_latest(manager, abstract_sharded)
    if state is not None:
        logging.info("Resuming from this workdir's checkpoint at step %d.", int(jax.device_get(state.step)))
        return state
    if config.resume:
        ref = restore.resume_ref(config, meta)
        logging.info("Resuming from config.resume=%s (step %s).", ref.path, ref.step)
        return checkpoint.restore_train_state(ref, abstract_sharded)
    if config.init_from and task is None:
        raise ValueError("config.init_from is set: initial_state needs the task that merges its weights (task=).")
    load_weights = task.init_from(config, meta) if config.init_from else None  # checked before the compile
    # The seed is an argument, not a constant, so runs that differ only in seed share one compile.
    seed = np.int32(config.seed)
    state = (
        jax.jit(init_fn, out_shardings=shardings).lower(seed).compile(compiler_options=_init_compiler_options())(seed)
    )
    if load_weights is not None:
        return load_weights(state, shardings)
    logging.info("Starting from scratch (seed %d).", config.seed)
    return state


def _record(config, task, info) -> dict[str, Any]:
    """What checkpoints record: the task's model record and the resume path this workdir started from."""
    return {**task.model_meta(config, info), "resume": config.resume}


def _hparams(config) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def visit(prefix, value):
        if hasattr(value, "items"):
            for k, v in value.items():
                visit(f"{prefix}{k}.", v)
        else:
            key = prefix[:-1]
            flat[key] = value if isinstance(value, (bool, int, float, str)) else str(value)

    visit("", config)
    return flat


def _last_eval(workdir: str, step: int) -> dict[str, float]:
    record = metrics_lib.read_jsonl(checkpoint.as_path(workdir) / metrics_lib.METRICS_FILE).get(step, {})
    return {k: v for k, v in record.items() if k.startswith("eval")}


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run derives from its config before touching the workdir."""

    mesh: Any
    task: Any  # tasks.base.Task
    info: Any  # the task's dataset_info
    model: Any
    meta: dict[str, Any]  # what checkpoints record about the model
    tx: Any
    schedule: Any
    base_lr: float
    steps_per_epoch: int
    total_steps: int
    init_fn: Any  # seed -> TrainState
    abstract: TrainState
    shardings: TrainState


def setup(config, task, devices: list | None = None) -> Setup:
    """Mesh (over `devices`, default all), dataset info, model, optimiser, schedule, abstract sharded state.

    `task`: the run's tasks.base.Task (`biformer_jax.tasks.get(config)`).
    """
    mesh = sharding.create_mesh(config.mesh, devices)
    info = task.dataset_info(config)
    model = from_config.model_from_config(config, info.num_classes)
    sharding.check_batch_size(config.global_batch_size, mesh, "config.global_batch_size")
    sharding.check_grad_accum(config.global_batch_size, config.grad_accum_steps, mesh)
    steps_per_epoch, total_steps = task.schedule_lengths(config, info)
    tx, schedule, base_lr = task.make_optimizer(config, steps_per_epoch, total_steps)
    init_fn = make_init_fn(config, model, tx, info.image_size)
    abstract = jax.eval_shape(init_fn, np.int32(config.seed))
    return Setup(
        mesh=mesh,
        task=task,
        info=info,
        model=model,
        meta=_record(config, task, info),
        tx=tx,
        schedule=schedule,
        base_lr=base_lr,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        init_fn=init_fn,
        abstract=abstract,
        shardings=sharding.state_shardings(abstract, mesh, config.sharding.fsdp_min_size),
    )


def make_init_fn(config, model, tx, image_size):
    """seed -> the fresh TrainState of `model` and `tx` (with EMA when config.ema_decay > 0).

    `image_size`: the side of square inputs, or (h, w) (segmentation crops).
    """
    h, w = image_size if isinstance(image_size, tuple) else (image_size, image_size)
    input_shape = (1, h, w, 3)
    return functools.partial(
        init_train_state,
        model=model,
        tx=tx,
        input_shape=input_shape,
        use_ema=config.ema_decay > 0,
        stack_blocks=block_layout.scans(model),
    )


def make_train_step(config, run: Setup):
    """The task's train step for the run, jitted over its mesh: (state, batch) -> (state, metrics).

    The state keeps its (FSDP or replicated) shardings in and out and is donated, so the update
    happens in place; the batch is split over every device; the metrics come back replicated.
    """
    step_fn = run.task.bind_train_step(config, run.model, run.tx, run.schedule, run.info)
    return jax.jit(
        # Pallas kernels shard_map over the batch: they need the mesh at trace time
        kernels_see_mesh(step_fn, run.mesh),
        in_shardings=(run.shardings, sharding.batch_sharding(run.mesh)),
        out_shardings=(run.shardings, sharding.replicated(run.mesh)),
        donate_argnums=0,
    )


def train_and_evaluate(config, workdir: str, task) -> dict[str, float]:
    """Trains config.model on config.data in `workdir` as `task` (tasks.get(config)); returns the final eval metrics.

    The returned dict holds the task's metrics prefixed "eval/" (classification: "eval/top1",
    "eval/top5", "eval/loss"; segmentation: "eval/mIoU", ...) and "eval_ema/..." with EMA.
    """
    workdir = checkpoint.as_path(workdir)  # gs://, s3:// or local (made absolute: Orbax needs that)
    run = setup(config, task)
    workdir.mkdir(parents=True, exist_ok=True)
    best_metric = config.checkpoint.best_metric if config.checkpoint.keep_best else ""
    manager = checkpoint_manager.create_manager(workdir, config.checkpoint, best_metric=best_metric)
    try:
        with preemption.Watcher() as watcher:
            return _train_loop(config, workdir, run, manager, best_metric, watcher)
    finally:
        # Also on an exception: a save already under way completes (it holds a good state).
        checkpoint_manager.close_manager(manager)


def _train_loop(config, workdir: str, run: Setup, manager, best_metric: str, watcher) -> dict[str, float]:
    state = initial_state(config, manager, run.init_fn, run.abstract, run.shardings, task=run.task, meta=run.meta)

    writer = writers.create_writer(workdir, process_index=jax.process_index())
    try:
        return _steps(config, workdir, run, manager, best_metric, watcher, state, writer)
    finally:
        writer.close()  # also when a step fails or the run is preempted: the event file is complete


def _steps(config, workdir, run: Setup, manager, best_metric, watcher, state, writer) -> dict[str, float]:
    """Trains from `state`'s step to the last one, logging, evaluating and checkpointing as configured."""
    mesh, batch, total_steps = run.mesh, config.global_batch_size, run.total_steps
    first_step = int(jax.device_get(state.step))
    logging.info(
        "%s: %s parameters, %d steps (%d per epoch), global batch %d, lr %.3g, mesh %s.",
        config.model,
        f"{parameter_overview.count_parameters(run.abstract.params):,}",
        total_steps,
        run.steps_per_epoch,
        batch,
        run.base_lr,
        dict(mesh.shape),
    )
    parameter_overview.log_parameter_overview(state.params, include_stats=False, max_lines=60)
    if first_step == 0:
        writer.write_hparams(_hparams(config))
    if first_step >= total_steps:
        logging.info("The workdir's checkpoint is already at step %d of %d.", first_step, total_steps)
        return _last_eval(workdir, first_step)

    train_step = make_train_step(config, run)
    evaluator = run.task.make_evaluator(config, run)
    train_iter = run.task.train_iterator(config, first_step)
    log_every = _every(config.log_every_steps, run.steps_per_epoch)
    eval_every = _every(config.eval_every_steps, run.steps_per_epoch)
    ckpt_every = _every(config.checkpoint.every_steps, run.steps_per_epoch)
    reporter = progress.ReportProgress(num_train_steps=total_steps, writer=writer)

    collected, since, last_good, t0 = None, 0, first_step, time.perf_counter()
    eval_metrics: dict[str, float] = {}
    for step in range(first_step + 1, total_steps + 1):  # `step` = updates done after this iteration
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, m = train_step(state, sharding.global_batch(next(train_iter), mesh))
        collected = m if collected is None else collected.merge(m)
        since += 1
        reporter(step)
        last = step == total_steps
        preempted = watcher.reached(step) and not last  # SIGTERM: log and save this step, then stop
        do_eval, do_ckpt = step % eval_every == 0 or last, step % ckpt_every == 0 or last or preempted
        if not (step % log_every == 0 or do_eval or do_ckpt):
            continue
        computed = collected.compute()  # waits for the steps so far
        elapsed, t0 = time.perf_counter() - t0, time.perf_counter()
        if computed["nonfinite"] > 0:
            raise NonFiniteLossError(
                f"Stopped: the loss or gradient became NaN/inf between steps {last_good + 1} and {step} "
                f"(those updates were not applied). The last good checkpoint "
                f"(step {manager.latest_step()}) is kept in {manager.directory}. Lower config.optim.lr, "
                "set config.optim.clip_grad_norm, or check the input data."
            )
        scalars = metrics_lib.prefixed({k: v for k, v in computed.items() if k != "nonfinite"}, "train")
        scalars["train/img_per_sec"] = since * batch / elapsed
        scalars["train/epoch"] = step / run.steps_per_epoch
        writer.write_scalars(step, scalars)
        collected, since, last_good = None, 0, step
        eval_metrics = {}
        if do_eval:
            with reporter.timed("eval"):
                evals = {"eval": state.variables}
                if state.has_ema:
                    evals["eval_ema"] = state.ema_variables
                for prefix, variables in evals.items():
                    eval_metrics.update(metrics_lib.prefixed(evaluator(variables, prefix), prefix))
            writer.write_scalars(step, eval_metrics)
            t0 = time.perf_counter()  # img/s counts training only
        if do_ckpt:
            checkpoint.save_train_state(
                manager, state, step=step, meta=run.meta, metrics=eval_metrics if best_metric in eval_metrics else None
            )
        if preempted:
            raise preemption.Preempted(step)  # train_and_evaluate waits for the save
    return eval_metrics


def summary_line(metrics: dict[str, float]) -> str:
    """The final metrics as one JSON line (the last line train.py prints)."""
    return json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in sorted(metrics.items())})
