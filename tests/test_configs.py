"""Every config file loads (plain and :runlocal), passes the data checks and builds its model (eval_shape only):
the classification configs, the segmentation configs (configs/seg/), the detection configs (configs/det/) and
the sweeps (configs/sweeps/)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from biformer_jax import models
from biformer_jax.data import config as data_config
from biformer_jax.data.segmentation import config as seg_config
from biformer_jax.data.segmentation import sources as seg_sources
from biformer_jax.models import from_config
from biformer_jax.training import sweeps

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
# Every experiment config file (a new one is checked without being listed here).
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))
SEG_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "seg").glob("*.py") if p.stem not in ("__init__", "common"))
DET_CONFIGS = sorted(
    p.stem for p in (ROOT / "configs" / "det").glob("*.py") if p.stem not in ("__init__", "common", "mask_common")
)
# Mask R-CNN releases: (lr, global batch, warmup iterations, images per loss group); all AdamW wd 0.05, 12 epochs.
MASK_RECIPES = {
    "maskrcnn_biformer_s": (1e-4, 16, 500, 2),
    "maskrcnn_biformer_b": (1e-4, 16, 500, 2),
    "maskrcnn_debiformer_s": (5e-5, 8, 1500, 1),
    "maskrcnn_debiformer_b": (2.5e-5, 16, 5000, 2),
}
SWEEPS = sorted(p.name for p in (ROOT / "configs" / "sweeps").glob("*.py"))
# Official recipes: (model, drop_path_rate, global batch, base lr per 512 images, warmup epochs, weight decay, EMA).
RECIPES = {
    "biformer_t": ("biformer_tiny", 0.1, 1024, 5e-4, 5.0, 0.05, 0.99996),
    "biformer_s": ("biformer_small", 0.15, 1024, 5e-4, 5.0, 0.05, 0.99996),
    "biformer_b": ("biformer_base", 0.4, 1024, 5e-4, 5.0, 0.05, 0.99996),
    "debiformer_t": ("debiformer_tiny", 0.0, 2048, 5e-4, 20.0, 0.1, 0.0),
}


def _load(name: str, arg: str | None = None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def test_every_experiment_config_is_checked():
    assert {"quickstart", "biformer_t", "biformer_s", "biformer_b", "debiformer_t", "debiformer_s"} <= set(CONFIGS)
    assert "debiformer_b" in CONFIGS


@pytest.mark.parametrize("arg", [None, "runlocal"])
@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds_its_model(name, arg):
    config = _load(name, arg)
    data_config.validate_config(config.data)
    data_config.validate_mixup_config(config.mixup)
    assert config.data.image_size % 32 == 0
    # A model name create_model does not know is a broken config (a typo), not a skip.
    assert config.model in models.list_models(), f"configs/{name}.py: model {config.model!r} is not registered"
    num_classes = 10 if name == "quickstart" else 1000
    model = from_config.model_from_config(config, num_classes=num_classes)
    if arg == "runlocal":
        plain = _load(name, None)
        if model == from_config.model_from_config(plain, num_classes=num_classes):
            assert config.data.image_size == plain.data.image_size
            return  # the same model at the same size: built once, for the plain config
    variables = from_config.abstract_variables(model, config.data.image_size)
    assert variables["params"]["head"]["kernel"].shape[-1] == num_classes
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) > 0


def test_every_config_file_under_configs_is_checked():
    files = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.py")}
    files -= {"__init__.py", "common.py", "seg/__init__.py", "seg/common.py", "det/__init__.py", "det/common.py"}
    files -= {"det/mask_common.py"}
    checked = {f"{n}.py" for n in CONFIGS} | {f"seg/{n}.py" for n in SEG_CONFIGS} | {f"sweeps/{n}" for n in SWEEPS}
    checked |= {f"det/{n}.py" for n in DET_CONFIGS}
    assert files == checked and len(SEG_CONFIGS) == 9 and len(DET_CONFIGS) == 10 and SWEEPS


@pytest.mark.parametrize("arg", [None, "runlocal"])
@pytest.mark.parametrize("name", SEG_CONFIGS)
def test_segmentation_config_loads_and_builds_its_model(name, arg):
    config = importlib.import_module(f"configs.seg.{name}").get_config(arg)
    if config.data.name == "ade20k":
        assert config.data.root == ""  # set on the command line: --config.data.root=...
        config.data.root = "/data/ADEChallengeData2016"
    seg_config.validate_seg_config(config.data)
    seg_config.validate_eval_config(config.eval)
    assert config.task == "segmentation"
    assert config.model in models.list_models(), f"configs/seg/{name}.py: model {config.model!r} is not registered"
    if arg == "runlocal":
        return  # the same model: built once, below, for the plain config
    names = seg_sources.read_class_names(config.data)  # ADE20K's and the shapes' need no dataset
    model = from_config.model_from_config(config, len(names))
    x = jax.ShapeDtypeStruct((1, *config.data.crop_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    assert variables["params"]["decode_head"]["conv_seg"]["kernel"].shape[-1] == len(names)


@pytest.mark.parametrize("arg", [None, "runlocal"])
@pytest.mark.parametrize("name", DET_CONFIGS)
def test_detection_config_loads_and_builds_its_model(name, arg):
    config = importlib.import_module(f"configs.det.{name}").get_config(arg)
    assert config.task == "detection" and config.data.name in ("coco", "synthetic")
    if config.data.name == "coco":
        assert config.data.root == ""  # set on the command line: --config.data.root=...
    assert config.model in models.list_models(), f"configs/det/{name}.py: model {config.model!r} is not registered"
    assert config.optim.lr > 0 and config.optim.schedule == "step" and config.checkpoint.best_metric == "eval/bbox_mAP"
    if arg == "runlocal" or name.startswith("quickstart"):
        return
    if name in MASK_RECIPES:
        lr, batch, warmup, group = MASK_RECIPES[name]
        assert (config.optim.lr, config.optim.weight_decay, config.num_epochs) == (lr, 0.05, 12)
        assert (config.global_batch_size, tuple(config.optim.lr_steps), config.optim.warmup_iters) == (
            batch,
            (8, 11),
            warmup,
        )
        assert config.loss_group_size == group and {"norm", "relative_position_bias_table"} <= set(
            config.optim.no_decay_keys
        )
        model = from_config.model_from_config(config, 80)
        variables = from_config.abstract_variables(model, (256, 320))
        assert variables["params"]["roi_head"]["bbox_head"]["fc_cls"]["kernel"].shape[-1] == 81
        return
    # the official recipe: AdamW 1e-4, weight decay 1e-4, 12 epochs at batch 16, x0.1 after 8 and 11
    assert (config.optim.lr, config.optim.weight_decay, config.num_epochs) == (1e-4, 1e-4, 12)
    assert (config.global_batch_size, tuple(config.optim.lr_steps), config.optim.warmup_iters) == (16, (8, 11), 500)
    model = from_config.model_from_config(config, 80)
    variables = from_config.abstract_variables(model, (256, 320))
    assert variables["params"]["bbox_head"]["retina_cls"]["kernel"].shape[-1] == 9 * 80


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_points_apply_to_the_config_they_name(name):
    path = ROOT / "configs" / "sweeps" / name
    base = re.search(r"--config=configs/(\S+)\.py", path.read_text())  # the launch command in its docstring
    assert base, f"configs/sweeps/{name} should name its --config=configs/<name>.py in its docstring"
    config = importlib.import_module("configs." + base.group(1).replace("/", ".")).get_config(None)
    points = sweeps.load_sweep(path)
    assert len({sweeps.run_name(p) for p in points}) == len(points) > 1
    for point in points:
        run = sweeps.apply_overrides(config, point)  # an unknown field fails here, naming it
        data_config.validate_config(run.data)
        assert all(run[k.split(".")[0]] is not None for k in point)


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
    assert "Traceback" not in proc.stderr + proc.stdout  # tracebacks go to stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        """error: a --config override does not fit the config ('lrr' Did you mean "lr" instead of "lrr"?); """
        "overrides given: --config.optim.lrr=1"
    ], proc.stderr


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
