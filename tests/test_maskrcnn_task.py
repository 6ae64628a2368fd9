"""Mask R-CNN through the detection task end to end on generated shapes with masks: train a few
steps (micro model), eval.py (bbox and segm AP, RLE masks in the results JSON), predict.py --draw
(masks in the JSON lines and on the drawn image), and the visualize routes on its backbone."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from biformer_jax import tasks
from biformer_jax.data.detection import masks as mask_ops
from biformer_jax.data.detection import synthetic
from biformer_jax.data.detection.evaluation import METRIC_NAMES, SEGM_METRIC_NAMES
from biformer_jax.tasks.detection import predict as det_predict
from biformer_jax.training import metrics as metrics_lib
from biformer_jax.training import train_lib
from configs.det import quickstart_mask

pytestmark = pytest.mark.usefixtures("compilation_cache")

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 96)
FLAGS = {
    "data.img_scale": (96, 64),
    "data.buckets": (SIZE,),
    "data.max_boxes": 4,
    "global_batch_size": 8,  # 1 per simulated CPU device
    "num_epochs": 1,  # 2 steps
    "optim.warmup_iters": 2,
    "log_every_steps": 1,
    "eval_every_steps": 2,
    "checkpoint.every_steps": 2,
    "eval.batch_size": 4,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The module's one Mask R-CNN run (train, eval with box and mask AP), shared by its tests.

    Over 60 s in the suite (about 85 s): a micro Mask R-CNN's train step (RPN, sampled RoIs,
    box and mask heads, forward and backward) and its evaluation compile once each."""
    root = synthetic.write_synthetic_coco(
        str(tmp_path_factory.mktemp("mask") / "coco"),
        num_train=16,
        num_val=4,
        size=SIZE,
        max_objects=2,
        obj_range=(16, 40),
    )
    config = quickstart_mask.get_config()
    config.data.root = root
    for key, value in FLAGS.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    workdir = tmp_path_factory.mktemp("mask_run") / "run"
    return root, workdir, train_lib.train_and_evaluate(config, str(workdir), tasks.get(config))


def test_train_eval_and_predict_with_masks(tmp_path, trained):
    root, workdir, final = trained
    assert set(final) == {f"eval/{k}" for k in METRIC_NAMES + SEGM_METRIC_NAMES}
    logged = metrics_lib.read_jsonl(workdir / metrics_lib.METRICS_FILE)
    assert all(np.isfinite(logged[s]["train/loss"]) and logged[s]["train/loss"] > 0 for s in (1, 2))

    flags = [f"--config.{k}={v}" for k, v in FLAGS.items() if k.startswith(("data", "eval."))]
    cmd = [sys.executable, str(ROOT / "eval.py"), f"--config={ROOT / 'configs/det/quickstart_mask.py'}"]
    cmd += [f"--checkpoint={workdir}", f"--config.data.root={root}", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(METRIC_NAMES + SEGM_METRIC_NAMES) <= set(result) and result["num_examples"] == 4
    assert result["segm_mAP"] == pytest.approx(final["eval/segm_mAP"], abs=1e-6)
    detections = json.loads(Path(result["detections_file"]).read_text())
    assert detections and {"image_id", "bbox", "score", "category_id", "segmentation"} == set(detections[0])
    rle = detections[0]["segmentation"]
    assert rle["size"] == list(SIZE) and isinstance(rle["counts"], str)  # the original image's size

    photo = Path(root) / "val2017" / "000000.png"
    cmd = [sys.executable, str(ROOT / "predict.py"), f"--checkpoint={workdir}", "--score_thr=0"]
    cmd += [f"--draw={tmp_path / 'drawn'}", str(photo)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[0])
    assert record["detections"] and all("mask" in d for d in record["detections"])
    drawn, original = np.asarray(Image.open(record["drawn"])), np.asarray(Image.open(photo))
    assert drawn.shape == original.shape
    np.testing.assert_array_equal(drawn, np.asarray(det_predict.draw(original, record["detections"])))

    # one mask away from its box's outline: its pixels are half the image, half the class colour
    m = np.zeros(SIZE, bool)
    m[20:40, 30:60] = True
    one = {
        "box": [0, 0, SIZE[1] - 1, SIZE[0] - 1],
        "score": 0.9,
        "label": 1,
        "class": "disc",
        "mask": mask_ops.encode(m),
    }
    painted = np.asarray(det_predict.draw(original, [one])).astype(np.float32)
    blend = 0.5 * original.astype(np.float32) + 0.5 * np.float32(det_predict.colour(1))
    assert np.abs(painted[m] - blend[m]).max() <= 0.5
    np.testing.assert_array_equal(painted[45:60, 65:90], original[45:60, 65:90])  # outside mask, outline, label


def test_visualize_routes_on_the_detectors_backbone(tmp_path, trained):
    root, workdir, _ = trained
    cmd = [sys.executable, "-m", "biformer_jax.visualize", "routes", f"--checkpoint={workdir}"]
    cmd += [f"--image={Path(root) / 'val2017' / '000000.png'}", f"--out={tmp_path / 'routes.png'}", "--query=32,48"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stages_2_1/attn query (y=32, x=48)" in out.stdout and "routes [" in out.stdout
    assert Image.open(tmp_path / "routes.png").size[0] > 0
