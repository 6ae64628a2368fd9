"""End to end: train + eval a micro BiFormer on digits, resume, NaN handling, init_from, sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from support import train_testlib
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from biformer_jax import data, models, tasks
from biformer_jax.convert import files as convert_files
from biformer_jax.tasks.classification import evaluate as eval_lib
from biformer_jax.training import checkpoint, checkpoint_manager, restore, sweeps, train_lib
from biformer_jax.training import metrics as metrics_lib

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _losses(workdir) -> dict[int, float]:
    records = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))
    return {step: r["train/loss"] for step, r in records.items() if "train/loss" in r}


def test_train_and_evaluate_writes_metrics_checkpoints_and_eval(tmp_path, micro_config):
    workdir = tmp_path / "run"
    final = train_lib.train_and_evaluate(micro_config(), workdir, tasks.get(micro_config()))

    assert set(final) == {f"{p}/{m}" for p in ("eval", "eval_ema") for m in ("top1", "top5", "loss")}
    assert all(0.0 <= final[f"{p}/top1"] <= final[f"{p}/top5"] <= 1.0 for p in ("eval", "eval_ema"))
    records = metrics_lib.read_jsonl(workdir / metrics_lib.METRICS_FILE)
    assert sorted(_losses(workdir)) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        r = records[step]
        for key in ("train/loss", "train/learning_rate", "train/grad_norm", "train/img_per_sec"):
            assert np.isfinite(r[key]), (step, key, r)
    assert {"eval/top1", "eval_ema/top1"} <= set(records[2]) and {"eval/top1", "eval_ema/top1"} <= set(records[4])
    # TensorBoard (its own reader): every scalar of metrics.jsonl, as float32, and the hyperparameters.
    (events,) = [p for p in workdir.iterdir() if p.name.startswith("events.out.tfevents.")]
    board = event_accumulator.EventAccumulator(str(events), size_guidance={event_accumulator.TENSORS: 0})
    board.Reload()
    scalars = {
        (e.step, tag): float(tensor_util.make_ndarray(e.tensor_proto))
        for tag in board.Tags()["tensors"]
        if board.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"
        for e in board.Tensors(tag)
    }
    want = {(step, k): np.float32(v) for step, r in records.items() for k, v in r.items() if k != "step"}
    assert scalars == want
    assert {"steps_per_sec", "uptime"} <= {k for _, k in scalars}  # the progress reports, at the last step
    hparams = board.SummaryMetadata("_hparams_/session_start_info").plugin_data
    assert hparams.plugin_name == "hparams" and b"biformer_micro" in hparams.content
    # Checkpoints every 2 steps (retention: the next test), complete and loadable by eval.
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    ref = checkpoint.resolve(workdir)
    assert (ref.kind, ref.step) == ("train", 4)
    assert checkpoint.load_meta(ref)["model"] == "biformer_micro"
    results = eval_lib.evaluate_checkpoint(micro_config(), str(workdir))
    assert results["top1"] == pytest.approx(final["eval/top1"]) and results["ema"]["top1"] == pytest.approx(
        final["eval_ema/top1"]
    )
    assert not (ref.path / tasks.EVAL_RESULTS_FILE).exists()  # eval.py prints first, then writes
    tasks.write_results(ref.path, results)
    assert json.loads((ref.path / tasks.EVAL_RESULTS_FILE).read_text())["top1"] == results["top1"]


def test_the_trainer_keeps_the_last_and_the_best_checkpoints_it_is_told_to(tmp_path, micro_config):
    """A checkpoint and an eval every step: the trainer hands each eval's metrics to the manager,
    which keeps the last `keep` and the `keep_best` lowest eval/loss, as many as configured."""
    overrides = {"num_train_steps": 6, "eval_every_steps": 1, "checkpoint.every_steps": 1, "checkpoint.keep": 1}
    overrides |= {"checkpoint.keep_best": 3, "checkpoint.best_metric": "eval/loss"}
    workdir, config = tmp_path / "run", micro_config(**overrides)
    train_lib.train_and_evaluate(config, workdir, tasks.get(config))
    records = metrics_lib.read_jsonl(workdir / metrics_lib.METRICS_FILE)
    losses = {step: r["eval/loss"] for step, r in records.items() if "eval/loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and len(set(losses.values())) == 6  # no ties to decide
    best = sorted(losses, key=losses.get)[:3]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == sorted({6, *best}), (steps, losses)


def test_the_trainer_starts_without_tensorflow():
    """train.py's imports (the trainer, its writers, the tasks) leave TensorFlow unloaded: it takes
    seconds to import, and only TFDS datasets and gs:// paths need it."""
    code = "import sys, train; assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=train_testlib.ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _converter_meta(**model_kwargs) -> dict:
    return {
        "format": checkpoint.VARIABLES_FORMAT,
        "model": "biformer_micro",
        "model_kwargs": {"depth": [1, 1, 1, 1], **model_kwargs},
        "source": "BiFormer-micro.pth",
        "weights": "model",
    }


def test_eval_py_evaluates_a_converted_checkpoint_and_prints_json_last(tmp_path, micro_config):
    model = models.create_model("biformer_micro", depth=(1, 1, 1, 1), num_classes=10)
    variables = train_testlib.random_variables(model, seed=1)
    convert_files.save_converted(tmp_path / "converted", variables, _converter_meta(num_classes=10))
    config_file = tmp_path / "micro.py"  # the tests' micro config, so the eval compile is a cache hit
    config_file.write_text(
        f"import sys\nsys.path.insert(0, {str(train_testlib.ROOT / 'tests')!r})\n"
        "from support import train_testlib\n\n\ndef get_config():\n    return train_testlib.micro_config()\n"
    )
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": train_testlib.enable_compilation_cache(),
        "PYTHONPATH": str(train_testlib.ROOT),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "eval.py",
            f"--config={config_file}",
            "--config.eval_steps=-1",
            f"--checkpoint={tmp_path / 'converted'}",
        ],
        cwd=train_testlib.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0 and np.isfinite(result["loss"])
    assert result["num_examples"] == data.dataset_info(micro_config().data).num_eval_examples
    assert "ema" not in result  # a converter checkpoint holds one set of weights
    assert json.loads((tmp_path / "converted" / tasks.EVAL_RESULTS_FILE).read_text()) == result
    # The same numbers in process, through the converter's own reader of that directory.
    loaded, meta = convert_files.load_converted(tmp_path / "converted")
    assert meta["model"] == "biformer_micro"
    direct = eval_lib.evaluate_checkpoint(micro_config(eval_steps=-1), str(tmp_path / "converted"))
    assert direct["top1"] == pytest.approx(result["top1"]) and direct["loss"] == pytest.approx(result["loss"], rel=1e-5)
    np.testing.assert_array_equal(loaded["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])


class Preempted(Exception):
    pass


def test_interrupted_run_resumes_with_identical_losses(tmp_path, monkeypatch, imagenet_micro_config):
    config = imagenet_micro_config()
    train_lib.train_and_evaluate(config, tmp_path / "straight", tasks.get(config))

    real_iterator = data.train_iterator

    def dies_after_five(*args, **kwargs):
        for i, batch in enumerate(real_iterator(*args, **kwargs)):
            if i == 5:
                raise Preempted("simulated preemption after 5 steps")
            yield batch

    monkeypatch.setattr(data, "train_iterator", dies_after_five)
    with pytest.raises(Preempted):
        train_lib.train_and_evaluate(config, tmp_path / "resumed", tasks.get(config))
    assert checkpoint.resolve(tmp_path / "resumed").step == 4  # steps 5 was lost with the "host"
    monkeypatch.setattr(data, "train_iterator", real_iterator)
    train_lib.train_and_evaluate(config, tmp_path / "resumed", tasks.get(config))  # the same command again

    straight, resumed = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == straight  # bit-identical, step by step
    lines = (tmp_path / "resumed" / metrics_lib.METRICS_FILE).read_text().splitlines()
    assert sum(json.loads(line)["step"] == 5 and "train/loss" in line for line in lines) == 2  # appended


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, micro_config):
    real_iterator = data.train_iterator

    def nan_at_step_three(*args, **kwargs):
        for i, batch in enumerate(real_iterator(*args, **kwargs)):
            if i == 2:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            yield batch

    monkeypatch.setattr(data, "train_iterator", nan_at_step_three)
    workdir = tmp_path / "nan"
    with pytest.raises(train_lib.NonFiniteLossError, match=r"between steps 3 and 3.*last good checkpoint \(step 2\)"):
        train_lib.train_and_evaluate(micro_config(), workdir, tasks.get(micro_config()))
    assert checkpoint.resolve(workdir).step == 2
    variables = checkpoint.load_variables(workdir)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_init_from_reinitialises_a_classifier_of_another_size(tmp_path, caplog, micro_config):
    config = micro_config()
    variables = train_testlib.random_variables(models.create_model("biformer_micro", depth=(1, 1, 1, 1), num_classes=7))
    # Written by the converter's own writer (python -m biformer_jax.convert), as official weights would be.
    convert_files.save_converted(tmp_path / "pretrained", variables, _converter_meta(num_classes=7))

    config.unlock()
    config.init_from = str(tmp_path / "pretrained")
    config.lock()
    run = train_lib.setup(config, tasks.get(config))
    manager = checkpoint_manager.create_manager(tmp_path / "ft", config.checkpoint, best_metric="")
    with caplog.at_level("WARNING"):
        state = train_lib.initial_state(config, manager, run.init_fn, run.abstract, run.shardings, task=run.task)
    manager.close()
    assert "head is re-initialised" in caplog.text
    assert state.params["head"]["kernel"].shape == (128, 10)
    np.testing.assert_array_equal(
        np.asarray(state.params["stages_2_0"]["attn"]["qkv"]["qkv"]["kernel"]),
        np.asarray(variables["params"]["stages_2_0"]["attn"]["qkv"]["qkv"]["kernel"]),
    )
    np.testing.assert_array_equal(  # the EMA starts from the loaded weights
        np.asarray(state.ema_params["downsample_layers_0"]["0"]["kernel"]),
        np.asarray(variables["params"]["downsample_layers_0"]["0"]["kernel"]),
    )


def test_checkpoint_of_another_model_lists_the_mismatches(tmp_path, micro_config):
    other = models.create_model(
        "biformer_micro", depth=(1, 1, 1, 1), embed_dim=(8, 32, 64, 128), qk_dims=(8, 32, 64, 128)
    )
    variables = train_testlib.random_variables(other)
    convert_files.save_converted(tmp_path / "other", variables, _converter_meta(embed_dim=[8, 32, 64, 128]))
    config = micro_config(init_from=str(tmp_path / "other"))
    with pytest.raises(restore.ArchitectureMismatchError, match=r"embed_dim: checkpoint \[8, 32, 64, 128\]"):
        train_lib.train_and_evaluate(config, tmp_path / "ft", tasks.get(config))
    # Differences named in init_from_overrides pass the architecture check, not the shape check.
    config = micro_config(init_from=str(tmp_path / "other"), init_from_overrides=("embed_dim",))
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        train_lib.train_and_evaluate(config, tmp_path / "ft", tasks.get(config))
    message = str(err.value)
    assert "wrong shape" in message
    assert "params/downsample_layers_0/0/kernel: checkpoint (3, 3, 3, 4), model (3, 3, 3, 8)" in message
    with pytest.raises(restore.ArchitectureMismatchError, match="embed_dim: checkpoint"):
        eval_lib.evaluate_checkpoint(micro_config(), str(tmp_path / "other"))


def test_sweep_runs_every_point_and_writes_a_summary(tmp_path, micro_config):
    sweep_file = tmp_path / "seeds.py"
    sweep_file.write_text("def get_sweep(h):\n    return h.product([h.sweep('config.seed', [0, 1])])\n")
    points = sweeps.load_sweep(sweep_file)
    assert points == [{"seed": 0}, {"seed": 1}]
    config = micro_config()  # the other tests' step count: their compiled step is reused
    rows = sweeps.run_sweep(
        config, points, str(tmp_path / "root"), lambda c, w: train_lib.train_and_evaluate(c, w, tasks.get(c))
    )
    assert [r["run"] for r in rows] == ["seed=0", "seed=1"] and all(r["status"] == "ok" for r in rows)
    assert all(0.0 <= r["eval/top1"] <= 1.0 and r["step"] == 4 for r in rows)
    assert _losses(tmp_path / "root" / "seed=0")[1] != _losses(tmp_path / "root" / "seed=1")[1]
    csv_lines = (tmp_path / "root" / "summary.csv").read_text().splitlines()
    assert (
        csv_lines[0].split(",")[:3] == ["run", "seed", "step"] and "eval/top1" in csv_lines[0] and len(csv_lines) == 3
    )
    assert "| seed=1 | 1 | 4 |" in (tmp_path / "root" / "summary.md").read_text()
    with pytest.raises(KeyError, match="no field 'lrr'"):
        sweeps.apply_overrides(config, {"optim.lrr": 1.0})
