"""Checkpoints that are damaged, of another model, or named wrong: what restore does (issue 16, items 2, 3, 6).

Most tests save a tiny hand-made TrainState (one 4-vector) through the trainer's own
CheckpointManager, so they need no model compile; the architecture checks stop before one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from support import train_testlib

from biformer_jax import models, tasks
from biformer_jax.models import from_config, spec
from biformer_jax.tasks.classification import evaluate as eval_lib
from biformer_jax.training import checkpoint, checkpoint_manager, restore, train_lib
from biformer_jax.training.train_state import TrainState

MICRO = {"model": "biformer_micro", "model_kwargs": {"depth": [1, 1, 1, 1], "num_classes": 10}}


def _state(value: float, step: int = 0) -> TrainState:
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params={"w": jnp.full((4,), value, jnp.float32)},
        batch_stats={},
        opt_state={"mu": jnp.full((4,), 2 * value, jnp.float32)},
        ema_params={},
        ema_batch_stats={},
        rng=jnp.zeros((2,), jnp.uint32),
    )


def _abstract() -> TrainState:
    where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), _state(0.0))


def _ckpt_cfg(keep=3, keep_best=False):
    return ml_collections.ConfigDict({"keep": keep, "keep_best": keep_best, "asynchronous": False})


def _save(manager, steps_values, meta=None, metrics=None):
    for step, value in steps_values:
        checkpoint.save_train_state(
            manager,
            _state(value, step),
            step=step,
            meta=meta or {**MICRO, "resume": ""},
            metrics=None if metrics is None else metrics[step],
        )
    manager.wait_until_finished()


def _step_dirs(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def _corrupt(step_dir) -> None:
    """What a VM lost mid-upload leaves: every data file of the train state truncated to nothing."""
    files = [p for p in (step_dir / "train").rglob("*") if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(b"")


# ---------------------------------------------------------------------------------------
# Item 3: a damaged latest checkpoint, config.resume, one-line errors


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_kept_step(tmp_path, caplog):
    manager = checkpoint_manager.create_manager(tmp_path, _ckpt_cfg(), best_metric="")
    _save(manager, [(1, 1.0), (2, 2.0)])
    _corrupt(tmp_path / "checkpoints" / "2")
    with caplog.at_level("WARNING"):
        state = restore.restore_latest(manager, _abstract())
    assert int(state.step) == 1 and float(state.params["w"][0]) == 1.0
    assert "Cannot read the checkpoint" in caplog.text and "Trying the previous checkpoint" in caplog.text
    # The unreadable step is kept, under another name, and no longer counts as a step.
    assert _step_dirs(tmp_path / "checkpoints") == ["1", "2" + restore.UNREADABLE_SUFFIX]
    assert any(p.is_file() for p in (tmp_path / "checkpoints" / "2.unreadable" / "train").rglob("*"))
    assert manager.all_steps() == [1]
    _save(manager, [(2, 3.0)])  # the run goes on and saves step 2 again
    assert int(restore.restore_latest(manager, _abstract()).step) == 2
    manager.close()


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    manager = checkpoint_manager.create_manager(tmp_path, _ckpt_cfg(), best_metric="")
    _save(manager, [(1, 1.0)])
    _corrupt(tmp_path / "checkpoints" / "1")
    with pytest.raises(checkpoint.CheckpointReadError, match=r"None of the checkpoints .* can be read"):
        restore.restore_latest(manager, _abstract())
    assert (tmp_path / "checkpoints" / "1.unreadable" / "train").is_dir()
    manager.close()


def test_a_model_mismatch_is_not_mistaken_for_damage(tmp_path):
    manager = checkpoint_manager.create_manager(tmp_path, _ckpt_cfg(), best_metric="")
    _save(manager, [(1, 1.0)])
    bigger = jax.tree.map(lambda s: jax.ShapeDtypeStruct((5,), s.dtype, sharding=s.sharding), _abstract())
    bigger = bigger.replace(step=_abstract().step, rng=_abstract().rng)
    with pytest.raises(checkpoint.CheckpointMismatchError):
        restore.restore_latest(manager, bigger)
    assert _step_dirs(tmp_path / "checkpoints") == ["1"]  # nothing set aside
    manager.close()


def test_resume_is_refused_when_the_workdir_has_checkpoints_of_its_own(tmp_path):
    config = train_testlib.micro_config(resume=str(tmp_path / "other_run"))
    meta = {**from_config.model_meta(config, 10), "resume": ""}
    manager = checkpoint_manager.create_manager(tmp_path / "run", _ckpt_cfg(), best_metric="")
    _save(manager, [(2, 1.0)], meta=meta)
    with pytest.raises(checkpoint.CheckpointError, match=r"config.resume=.* already has its own checkpoints"):
        train_lib.initial_state(config, manager, None, None, None, meta={**meta, "resume": config.resume})
    manager.close()
    # The same command re-run after a preemption (its checkpoints started from that resume) is fine.
    manager = checkpoint_manager.create_manager(tmp_path / "resumed", _ckpt_cfg(), best_metric="")
    _save(manager, [(2, 1.0)], meta={**meta, "resume": config.resume})
    restore.check_own_checkpoint(config, manager, {**meta, "resume": config.resume})
    manager.close()


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "typo", r"No checkpoint at .*typo \(no such directory\)"),
        (lambda d: (d / "BiFormer-S.pth").write_bytes(b"\x80") and d / "BiFormer-S.pth", r"must be converted first"),
        (lambda d: d / "empty_dir", r"No checkpoint at .*empty_dir\. Expected"),
    ],
    ids=["typo", "pth", "empty"],
)
def test_init_from_that_is_no_checkpoint_names_the_problem(tmp_path, make, expected):
    (tmp_path / "empty_dir").mkdir()
    path = make(tmp_path)
    with pytest.raises(checkpoint.CheckpointNotFoundError, match=expected):
        checkpoint.resolve(path)


def test_a_step_without_its_train_item_cannot_be_resumed(tmp_path):
    manager = checkpoint_manager.create_manager(tmp_path, _ckpt_cfg(), best_metric="")
    _save(manager, [(1, 1.0)])
    manager.close()
    step_dir = tmp_path / "checkpoints" / "1"
    (step_dir / "train").rename(tmp_path / "train_moved")
    ref = checkpoint.resolve(step_dir)
    with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"has no 'train' item"):
        checkpoint.restore_train_state(ref, _abstract())


def test_train_py_prints_one_line_for_a_bad_init_from(tmp_path):
    """The entry point: exit status 1, one `error:` line on stderr, no traceback, before any compile."""
    (tmp_path / "BiFormer-S.pth").write_bytes(b"\x80\x02")
    env = {**os.environ, "PYTHONPATH": str(train_testlib.ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/quickstart.py",
            f"--config.init_from={tmp_path / 'BiFormer-S.pth'}",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=train_testlib.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "must be converted first: python -m biformer_jax.convert" in errors[0], proc.stderr


# ---------------------------------------------------------------------------------------
# Item 6: best-checkpoint retention


@pytest.mark.parametrize(
    "metric, values, kept_best",
    [
        ("eval/loss", {1: 0.5, 2: 0.2, 3: 0.9, 4: 0.7}, "2"),  # lowest loss
        ("eval/top1", {1: 0.5, 2: 0.2, 3: 0.9, 4: 0.7}, "3"),  # highest accuracy
    ],
)
def test_best_checkpoint_retention_keeps_the_best(tmp_path, metric, values, kept_best):
    manager = checkpoint_manager.create_manager(tmp_path, _ckpt_cfg(keep=1, keep_best=True), best_metric=metric)
    _save(manager, [(s, float(s)) for s in values], metrics={s: {metric: v} for s, v in values.items()})
    manager.close()
    assert _step_dirs(tmp_path / "checkpoints") == sorted({kept_best, "4"})  # the best + the latest


# ---------------------------------------------------------------------------------------
# Item 2: a checkpoint records its architecture and restoring checks it


@pytest.mark.parametrize(
    "field, value",
    [("topks", [1, 2, 1, -2]), ("n_win", 4), ("pre_norm", False), ("soft_routing", True), ("auto_pad", True)]
    + [("qk_scale", 0.5)],
)
def test_shape_preserving_architecture_changes_are_differences(field, value):
    other = {"model": "biformer_micro", "model_kwargs": {**MICRO["model_kwargs"], field: value}}
    diffs = spec.differences(other, MICRO)
    assert len(diffs) == 1 and diffs[0].startswith(f"{field}: checkpoint "), diffs
    assert spec.differences(other, MICRO, allow=[field]) == []
    # Shapes alone would not have told: the variables have the same names and shapes.
    shapes = [
        jax.tree.map(lambda s: s.shape, from_config.abstract_variables(models.create_model(m["model"], **kw), 128))
        for m in (other, MICRO)
        for kw in [{k: tuple(v) if isinstance(v, list) else v for k, v in m["model_kwargs"].items()}]
    ]
    assert shapes[0] == shapes[1]


def test_defaults_and_variant_names_are_not_differences():
    kwargs = spec.architecture("biformer_micro", {})  # every field, spelled out
    del kwargs["class"]
    same = {"model": "biformer", "model_kwargs": {**kwargs, "drop_path_rate": 0.3, "dtype": jnp.bfloat16}}
    assert spec.differences(same, {"model": "biformer_micro", "model_kwargs": {}}) == []


def _workdir_with(tmp_path, meta) -> checkpoint.CheckpointRef:
    manager = checkpoint_manager.create_manager(tmp_path, _ckpt_cfg(), best_metric="")
    _save(manager, [(1, 1.0)], meta=meta)
    manager.close()
    return checkpoint.resolve(tmp_path)


def test_resume_init_from_and_eval_stop_on_another_architecture(tmp_path):
    config = train_testlib.micro_config()
    meta = {**from_config.model_meta(config, 10), "resume": ""}
    recorded = {**meta, "model_kwargs": {**meta["model_kwargs"], "topks": [1, 1, 1, -2], "pre_norm": False}}
    _workdir_with(tmp_path / "run", recorded)
    expected = r"another architecture.*\n  pre_norm: checkpoint False, config True\n  topks: checkpoint \[1, 1, 1, -2\]"

    manager = checkpoint_manager.create_manager(tmp_path / "run", _ckpt_cfg(), best_metric="")
    with pytest.raises(restore.ArchitectureMismatchError, match=expected):  # the workdir's own (restart)
        train_lib.initial_state(config, manager, None, None, None, meta=meta)
    manager.close()
    empty = checkpoint_manager.create_manager(tmp_path / "fresh", _ckpt_cfg(), best_metric="")
    with pytest.raises(restore.ArchitectureMismatchError, match=expected):  # config.resume
        train_lib.initial_state(
            train_testlib.micro_config(resume=str(tmp_path / "run")), empty, None, None, None, meta=meta
        )
    with pytest.raises(restore.ArchitectureMismatchError, match="init_from_overrides"):  # config.init_from
        ft_config = train_testlib.micro_config(init_from=str(tmp_path / "run"))
        train_lib.initial_state(ft_config, empty, None, None, None, task=tasks.get(ft_config), meta=meta)
    empty.close()
    with pytest.raises(restore.ArchitectureMismatchError, match=expected):  # eval.py
        eval_lib.evaluate_checkpoint(config, str(tmp_path / "run"))


def test_init_from_accepts_the_differences_the_config_names(tmp_path):
    config = train_testlib.micro_config()
    meta = from_config.model_meta(config, 10)
    recorded = {**meta, "model_kwargs": {**meta["model_kwargs"], "topks": [1, 1, 1, -2], "num_classes": 7}}
    ref = _workdir_with(tmp_path, recorded)
    with pytest.raises(restore.ArchitectureMismatchError, match="topks") as err:
        restore.init_from_ref(train_testlib.micro_config(init_from=str(tmp_path)), meta)
    assert "num_classes: checkpoint" not in str(err.value)  # the classifier width may always differ
    allowed = train_testlib.micro_config(init_from=str(tmp_path), init_from_overrides=("topks",))
    assert restore.init_from_ref(allowed, meta) == ref
    np.testing.assert_array_equal(checkpoint.load_variables(ref)["params"]["w"], np.ones(4, np.float32))
