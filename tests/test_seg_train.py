"""A miniature ADE20K folder through prepare, train (micro Semantic FPN), resume, eval.py and predict."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from support.segmentation import write_mini_ade

from biformer_jax import tasks
from biformer_jax.data.segmentation import config as seg_config
from biformer_jax.data.segmentation import prepare as seg_prepare
from biformer_jax.data.segmentation import transforms as seg_transforms
from biformer_jax.ops.resize import resize_bilinear
from biformer_jax.tasks.segmentation import checkpoint_eval, predict
from biformer_jax.training import checkpoint, train_lib
from configs.seg import sfpn_biformer_s

pytestmark = pytest.mark.usefixtures("compilation_cache")

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"training": [(48, 64), (64, 48), (56, 72), (64, 64), (40, 80), (72, 56), (64, 60), (50, 70)]}
SIZES["validation"] = [(48, 60), (64, 80)]
# The run below as train.py / eval.py flags (sfpn_biformer_s's recipe, micro model, 64 px).
FLAGS = {
    "model": "sfpn_biformer_micro",
    "compute_dtype": "float32",
    "global_batch_size": 8,  # 1 per simulated CPU device
    "num_train_steps": 4,
    "optim.warmup_iters": 2,
    "log_every_steps": 1,
    "eval_every_steps": 4,
    "checkpoint.every_steps": 2,
    "checkpoint.keep": 3,
    "data.crop_size": (64, 64),
    "data.scale": (256, 64),
    "data.threads": 2,
    "eval.scale": (256, 64),
}


@pytest.fixture(scope="module")
def mini_ade(tmp_path_factory):
    root = write_mini_ade(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016", SIZES)
    cfg = seg_config.default_seg_config()
    cfg.root = str(root)
    info = seg_prepare.prepare_seg_dataset(cfg)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (8, 2, 150)
    return root


def micro_config(root, **overrides):
    config = sfpn_biformer_s.get_config()
    config.data.root = str(root)
    for key, value in {**FLAGS, **overrides}.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def test_prepare_lists_every_bad_example(tmp_path):
    root = write_mini_ade(tmp_path / "ADEChallengeData2016", {"training": [(32, 32)] * 3, "validation": [(32, 32)]})
    labels = sorted((root / "annotations" / "training").glob("*.png"))
    Image.fromarray(np.zeros((16, 32), np.uint8), "L").save(labels[0])  # wrong size
    Image.fromarray(np.full((32, 32), 200, np.uint8), "L").save(labels[1])  # class 199 of 150
    cfg = seg_config.default_seg_config()
    cfg.root = str(root)
    with pytest.raises(ValueError, match=r"(?s)2 example\(s\) need fixing.*label map is 32x16.*class ids \[200\]"):
        seg_prepare.prepare_seg_dataset(cfg)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, mini_ade):
    """The micro run, trained once for the tests below: (its workdir, its final metrics)."""
    workdir = tmp_path_factory.mktemp("seg_run") / "straight"
    config = micro_config(mini_ade)
    return workdir, train_lib.train_and_evaluate(config, str(workdir), tasks.get(config))


def test_train_resume_and_eval(tmp_path, mini_ade, straight_run):
    config = micro_config(mini_ade)
    workdir, straight = straight_run
    assert {"eval/mIoU", "eval/mAcc", "eval/aAcc"} <= set(straight)
    assert 0.0 <= straight["eval/mIoU"] <= 1.0

    # A run that lost its host after step 2 restarts from its checkpoint and ends where the
    # uninterrupted one did, weight for weight.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(workdir / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
    resumed = train_lib.train_and_evaluate(config, str(tmp_path / "resumed"), tasks.get(config))
    a = checkpoint.load_variables(checkpoint.resolve(workdir))
    b = checkpoint.load_variables(checkpoint.resolve(tmp_path / "resumed"))
    assert checkpoint.resolve(tmp_path / "resumed").step == 4
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert resumed == pytest.approx(straight)

    # eval.py: the per-class table, then one JSON line last; slide mode on the same weights.
    flags = [f"--config.{k}={v}" for k, v in FLAGS.items() if not k.startswith(("optim", "checkpoint", "log"))]
    cmd = [sys.executable, str(ROOT / "eval.py"), f"--config={ROOT / 'configs/seg/sfpn_biformer_s.py'}"]
    cmd += [f"--checkpoint={workdir}", f"--config.data.root={mini_ade}", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["num_examples"] == 2 and result["mIoU"] == pytest.approx(straight["eval/mIoU"], abs=1e-6)
    assert {"mAcc", "aAcc"} <= set(result) and any(line.startswith("| wall ") for line in lines)

    slide = checkpoint_eval.evaluate_checkpoint(
        micro_config(mini_ade, **{"eval.mode": "slide", "eval.crop_size": (64, 64), "eval.stride": (43, 43)}),
        str(workdir),
    )
    assert slide["eval_mode"] == "slide" and 0.0 <= slide["mIoU"] <= 1.0
    # Only eval.py writes (after printing): the library call left its whole-mode file as it was.
    assert json.loads((Path(result["checkpoint"]) / "eval_results.json").read_text()) == result


def test_predict_writes_the_models_argmax_and_blends_the_overlay(tmp_path, mini_ade, straight_run):
    """predict.py's label PNG is the argmax of the model's logits (the test view through
    model.apply, bilinearly resized to the view, then to the photo) at the photo's full size, its
    mask the palette of those labels, its overlay image * (1 - opacity) + mask * opacity."""
    config, (workdir, _) = micro_config(mini_ade), straight_run
    photos = tmp_path / "photos"
    photos.mkdir()
    # A textured photo (stripes, a checkerboard, noise) of a size off the test scale's grid.
    yy, xx = np.mgrid[0:44, 0:58]
    pattern = np.stack([(xx * 9) % 256, (yy * 13) % 256, ((xx // 6 + yy // 6) % 2) * 220], axis=-1)
    image = np.clip(pattern + np.random.default_rng(7).integers(0, 60, (44, 58, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(photos / "a.png")  # lossless: predict reads exactly these pixels
    written = predict.predict_folder(config, str(workdir), str(photos), str(tmp_path / "pred"), opacity=0.3)
    assert sorted(p.name for p in written) == ["a_labels.png", "a_mask.png", "a_overlay.png"]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == sorted(p.name for p in written)  # no .tmp left
    labels, mask, blend = (
        np.asarray(Image.open(tmp_path / "pred" / f"a_{k}.png")) for k in ("labels", "mask", "overlay")
    )

    model, names, _, variables, _ = checkpoint_eval.load_model_and_variables(config, str(workdir))
    view = seg_transforms.test_view(
        image, config.eval.scale, 1.0, config.eval.size_divisor, config.data.mean, config.data.std
    )  # (64, 96, 3): the shorter side to 64, then multiples of 32
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))  # one compile, not one per eager op
    logits = apply(variables, jnp.asarray(view)[None]).astype(jnp.float32)  # (1, 16, 24, K)
    logits = np.asarray(resize_bilinear(resize_bilinear(logits, view.shape[:2]), image.shape[:2]))[0]  # (44, 58, K)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4  # rounding may only decide near-ties
    assert labels.shape == image.shape[:2] and clear.mean() > 0.99
    np.testing.assert_array_equal(labels[clear], logits.argmax(-1)[clear])
    assert len(np.unique(labels)) >= 2  # the check sees a structured prediction, not one class
    colours = predict.palette(names)
    np.testing.assert_array_equal(mask, colours[labels])
    np.testing.assert_array_equal(blend, np.round(image * 0.7 + colours[labels] * 0.3).astype(np.uint8))
    with pytest.raises(FileExistsError, match="--overwrite"):
        predict.predict_folder(config, str(workdir), str(photos), str(tmp_path / "pred"))
