"""Every config file loads (plain and :runlocal), passes the data checks and builds its model (eval_shape only)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import jax
import pytest

from biformer_jax import models
from biformer_jax.data import config as data_config
from biformer_jax.models import from_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
CONFIGS = ["quickstart", "biformer_t", "biformer_s", "biformer_b", "debiformer_t", "debiformer_s", "debiformer_b"]
# Official recipes: (model, drop_path_rate, global batch, base lr per 512 images, warmup epochs, weight decay, EMA).
RECIPES = {
    "biformer_t": ("biformer_tiny", 0.1, 1024, 5e-4, 5.0, 0.05, 0.99996),
    "biformer_s": ("biformer_small", 0.15, 1024, 5e-4, 5.0, 0.05, 0.99996),
    "biformer_b": ("biformer_base", 0.4, 1024, 5e-4, 5.0, 0.05, 0.99996),
    "debiformer_t": ("debiformer_tiny", 0.0, 2048, 5e-4, 20.0, 0.1, 0.0),
}


def _load(name: str, arg: str | None = None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds_its_model(name):
    for arg in (None, "runlocal"):
        config = _load(name, arg)
        data_config.validate_config(config.data)
        data_config.validate_mixup_config(config.mixup)
        assert config.data.image_size % 32 == 0
    if config.model not in models.list_models():
        pytest.skip(f"{config.model} is not registered in create_model yet")
    model = from_config.model_from_config(config, num_classes=1000 if name != "quickstart" else 10)
    variables = from_config.abstract_variables(model, config.data.image_size)
    assert variables["params"]["head"]["kernel"].shape[-1] == (10 if name == "quickstart" else 1000)
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) > 0


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_imagenet_configs_follow_the_official_recipe(name):
    model, drop_path, batch, lr, warmup, wd, ema = RECIPES[name]
    c = _load(name)
    assert (c.model, c.model_kwargs.drop_path_rate, c.global_batch_size) == (model, drop_path, batch)
    assert (c.optim.lr, c.optim.lr_base_batch_size, c.optim.warmup_epochs, c.optim.weight_decay) == (
        lr,
        512,
        warmup,
        wd,
    )
    assert (c.num_epochs, c.ema_decay, c.mixup.label_smoothing, c.data.image_size, c.data.eval_resize) == (
        300,
        ema,
        0.1,
        224,
        256,
    )
    assert c.data.name == "imagenet2012" and c.data.interpolation == "bicubic"


def test_bad_config_argument_fails():
    with pytest.raises(ValueError, match="Unknown config argument 'fast'"):
        _load("biformer_s", "fast")


def test_unknown_config_field_fails_at_once():
    # No import of jax work happens before the flags are parsed: this fails in about a second.
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/quickstart.py",
            "--workdir=/nonexistent",
            "--config.optim.lrr=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr and "Traceback" not in proc.stdout


def test_missing_dataset_stops_train_py_with_instructions(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config=configs/biformer_t.py:runlocal",
            f"--workdir={tmp_path / 'run'}",
            f"--config.data.data_dir={tmp_path / 'no_tfds'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "ILSVRC2012_img_train.tar" in proc.stderr and "biformer_jax.data.prepare" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
