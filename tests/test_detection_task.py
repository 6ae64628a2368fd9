"""The detection task end to end on a generated COCO-format dataset: train (micro RetinaNet), resume,
eval.py (COCO box AP), predict.py --draw; init_from, the schedule, the registry, a missing dataset."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from biformer_jax import models, tasks
from biformer_jax.convert import files as convert_files
from biformer_jax.data import DatasetNotPreparedError
from biformer_jax.data.detection import synthetic
from biformer_jax.data.detection.evaluation import METRIC_NAMES
from biformer_jax.models import from_config
from biformer_jax.models.detection import DETECTION_VARIANTS
from biformer_jax.tasks.detection import data as det_data
from biformer_jax.tasks.detection import optim as det_optim
from biformer_jax.tasks.detection import predict as det_predict
from biformer_jax.training import checkpoint, train_lib
from biformer_jax.training import metrics as metrics_lib
from configs.det import quickstart, retinanet_biformer_s, retinanet_debiformer_s

pytestmark = pytest.mark.usefixtures("compilation_cache")

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 96)  # generated images (h, w): one bucket, no resize
# The run below as train.py / eval.py flags: the quickstart's recipe on 16 + 4 tiny images, 4 steps.
FLAGS = {
    "data.img_scale": (96, 64),
    "data.buckets": (SIZE,),
    "data.max_boxes": 4,
    "global_batch_size": 8,  # 1 per simulated CPU device
    "num_epochs": 2,  # 2 steps per epoch
    "optim.warmup_iters": 2,
    "optim.lr_steps": (1,),
    "log_every_steps": 1,
    "eval_every_steps": 4,
    "checkpoint.every_steps": 2,
    "checkpoint.keep": 3,
    "eval.batch_size": 4,
}


@pytest.fixture(scope="module")
def det_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("det") / "coco"
    return synthetic.write_synthetic_coco(
        str(root), num_train=16, num_val=4, size=SIZE, max_objects=2, obj_range=(16, 40)
    )


def micro_config(root, **overrides):
    config = quickstart.get_config()
    config.data.root = str(root)
    for key, value in {**FLAGS, **overrides}.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, det_root):
    """The module's uninterrupted RetinaNet run, shared by its tests. About 40-60 s in the suite:
    the micro detector's train step and evaluation compile once each."""
    workdir = tmp_path_factory.mktemp("det_run") / "straight"
    config = micro_config(det_root)
    return workdir, train_lib.train_and_evaluate(config, str(workdir), tasks.get(config))


@pytest.fixture(scope="module")
def detecting_checkpoint(tmp_path_factory, straight_run):
    """The straight run's weights with retina_cls's bias raised by 6 (scores ~0.8): a checkpoint that
    detects after 4 steps (the trained one scores below the test threshold 0.05 everywhere)."""
    workdir, _ = straight_run
    ref = checkpoint.resolve(workdir)
    variables = checkpoint.load_variables(ref)
    bias = variables["params"]["bbox_head"]["retina_cls"]["bias"]
    variables["params"]["bbox_head"]["retina_cls"]["bias"] = np.asarray(bias) + 6.0
    meta = {k: v for k, v in checkpoint.load_meta(ref).items() if k in ("model", "model_kwargs", "data")}
    path = tmp_path_factory.mktemp("det_ckpt") / "detecting"
    convert_files.save_converted(path, variables, {"format": checkpoint.VARIABLES_FORMAT, **meta})
    return path


def test_train_resume_and_eval(tmp_path, det_root, straight_run, detecting_checkpoint):
    config = micro_config(det_root)
    workdir, straight = straight_run
    assert set(straight) == {f"eval/{k}" for k in METRIC_NAMES}
    assert 0.0 <= straight["eval/bbox_mAP"] <= 1.0 and 0.0 <= straight["eval/bbox_mAP_50"] <= 1.0
    logged = metrics_lib.read_jsonl(workdir / metrics_lib.METRICS_FILE)
    assert all(np.isfinite(logged[s]["train/loss"]) and logged[s]["train/loss"] > 0 for s in (1, 2, 3, 4))
    assert logged[4]["train/learning_rate"] == pytest.approx(2e-4)  # x0.1 after epoch 1 (steps 3, 4)

    # Restarted after step 2 from its checkpoint: the same losses and weights as the uninterrupted run.
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(workdir / "checkpoints" / "2", tmp_path / "resumed" / "checkpoints" / "2")
    resumed = train_lib.train_and_evaluate(config, str(tmp_path / "resumed"), tasks.get(config))
    again = metrics_lib.read_jsonl(tmp_path / "resumed" / metrics_lib.METRICS_FILE)
    assert [again[s]["train/loss"] for s in (3, 4)] == [logged[s]["train/loss"] for s in (3, 4)]
    a = checkpoint.load_variables(checkpoint.resolve(workdir))
    b = checkpoint.load_variables(checkpoint.resolve(tmp_path / "resumed"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert resumed == pytest.approx(straight)

    # eval.py: one JSON line last with the box APs, written next to the COCO results JSON.
    flags = [f"--config.{k}={v}" for k, v in FLAGS.items() if k.startswith(("data", "eval."))]
    cmd = [sys.executable, str(ROOT / "eval.py"), f"--config={ROOT / 'configs/det/quickstart.py'}"]
    cmd += [f"--checkpoint={detecting_checkpoint}", f"--config.data.root={det_root}", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_examples"] == 4 and set(METRIC_NAMES) <= set(result)
    assert 0.0 < result["bbox_mAP_50"] <= 1.0  # every anchor scores high: some boxes hit
    detections = json.loads(Path(result["detections_file"]).read_text())
    assert Path(result["detections_file"]).parent == Path(result["checkpoint"])
    assert json.loads((Path(result["checkpoint"]) / "eval_results.json").read_text()) == result
    assert detections and {"image_id", "bbox", "score", "category_id"} == set(detections[0])
    assert {d["category_id"] for d in detections} <= {1, 2, 3} and {d["image_id"] for d in detections} == {1, 2, 3, 4}
    assert len(detections) <= 4 * 100  # max_per_img


def test_predict_draws_the_boxes_it_reports(tmp_path, det_root, detecting_checkpoint):
    workdir = detecting_checkpoint
    photo = Path(det_root) / "val2017" / "000000.png"
    cmd = [sys.executable, str(ROOT / "predict.py"), f"--checkpoint={workdir}", "--score_thr=0"]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cmd += [f"--draw={tmp_path / 'drawn'}", str(photo), str(tmp_path / "broken.png")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 1 and "broken.png" in out.stderr and "1 of 2 images" in out.stderr  # named, skipped
    record = json.loads(out.stdout.strip().splitlines()[0])
    assert record["path"] == str(photo) and record["detections"], record
    best = record["detections"][0]
    assert best["class"] in synthetic.CLASSES and 0 <= best["score"] <= 1
    x1, y1, x2, y2 = best["box"]
    assert 0 <= x1 <= x2 <= SIZE[1] and 0 <= y1 <= y2 <= SIZE[0]  # the image's own pixels

    drawn = np.asarray(Image.open(record["drawn"]))
    original = np.asarray(Image.open(photo))
    assert drawn.shape == original.shape
    colour = np.uint8(det_predict.colour(best["label"]))
    rows = drawn[max(int(y2) - 1, 0) : int(y2) + 2, int(x1) + 1 : max(int(x2) - 1, int(x1) + 2)]
    assert (rows == colour).all(axis=-1).any()  # the box's bottom edge in its class's colour

    # the same checkpoint through the library: the reported detections
    detector = det_predict.load(str(workdir))
    again = det_predict.detect_image(detector, original)
    assert again[0]["box"] == best["box"] and again[0]["score"] == best["score"]


def _save(path, model_name, abstract, fill, model_kwargs=None):
    variables = jax.tree.map(lambda s: np.full(s.shape, fill, s.dtype), abstract)
    meta = {"format": checkpoint.VARIABLES_FORMAT, "model": model_name, "model_kwargs": model_kwargs or {}}
    convert_files.save_converted(path, variables, meta)
    return str(path)


def _fresh_state(config, num_classes):
    model = from_config.model_from_config(config, num_classes)
    tx, _, _ = tasks.get(config).make_optimizer(config, 2, 4)
    abstract = jax.eval_shape(train_lib.make_init_fn(config, model, tx, SIZE), np.int32(0))
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return state, jax.tree.map(lambda _: device, abstract)


def _flat(params):
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def test_init_from_a_classifier_backbone_and_a_detection_checkpoint(tmp_path, det_root):
    config = micro_config(det_root)
    meta = tasks.get(config).model_meta(config, det_data.dataset_info(config))
    classifier = models.create_model("biformer_micro")
    config.init_from = _save(tmp_path / "cls", "biformer_micro", from_config.abstract_variables(classifier, 64), 1.0)
    state, shardings = _fresh_state(config, 3)
    loaded = _flat(tasks.get(config).init_from(config, meta)(state, shardings).params)
    backbone = [k for k in loaded if k.startswith("backbone/") and "extra_norms" not in k]
    assert backbone and all(np.all(loaded[k] == 1.0) for k in backbone)
    assert all(np.all(v == 0.0) for k, v in loaded.items() if k not in backbone)  # neck, head, extra_norms fresh

    # a detection checkpoint of the same model with 5 classes: everything but retina_cls loads
    other = from_config.abstract_variables(models.create_model("retinanet_biformer_micro", num_classes=5), SIZE)
    config.init_from = _save(tmp_path / "det5", "retinanet_biformer_micro", other, 2.0, {"num_classes": 5})
    loaded = _flat(tasks.get(config).init_from(config, meta)(state, shardings).params)
    fresh = [k for k in loaded if "retina_cls" in k]
    assert fresh and all(np.all(loaded[k] == 0.0) for k in fresh)
    assert all(np.all(v == 2.0) for k, v in loaded.items() if k not in fresh)


def test_schedule_and_decay_rule():
    config = retinanet_biformer_s.get_config()
    schedule = det_optim.lr_schedule(config.optim, steps_per_epoch=1000)  # 12 epochs, x0.1 after 8 and 11
    lr = lambda step: float(schedule(step)) / 1e-4  # noqa: E731  (float32 -> relative)
    assert lr(0) == pytest.approx(1e-3, rel=1e-4) and lr(250) == pytest.approx(1 - 0.5 * 0.999, rel=1e-6)
    assert lr(500) == pytest.approx(1.0) and lr(7999) == pytest.approx(1.0)
    assert lr(8000) == pytest.approx(0.1) and lr(10999) == pytest.approx(0.1) and lr(11000) == pytest.approx(0.01)

    debi = retinanet_debiformer_s.get_config()
    assert debi.optim.no_decay_keys == ("bn", "norm") and debi.optim.weight_decay == 1e-4
    assert quickstart.get_config().optim.no_decay_keys == ()  # BiFormer's: decay on every parameter


def test_registry_and_records():
    config = quickstart.get_config()
    assert tasks.get(config).name == "detection"
    assert {tasks.for_record({"model": n}).name for n in DETECTION_VARIANTS} == {"detection"}
    assert tasks.for_record({"model": "biformer_small"}).name == "classification"
    assert tasks.for_record({"model": "sfpn_biformer_small"}).name == "segmentation"


def test_a_missing_dataset_says_where_and_how(tmp_path):
    config = quickstart.get_config()
    config.data.name = "coco"
    with pytest.raises(DatasetNotPreparedError, match=r"config.data.root is not set.*--config.data.root=ROOT"):
        tasks.get(config).dataset_info(config)
    config.data.root = str(tmp_path)
    expected = os.path.join(str(tmp_path), "annotations", "instances_train2017.json")
    with pytest.raises(DatasetNotPreparedError, match=rf"{expected} not found.*annotations_trainval2017.zip"):
        tasks.get(config).dataset_info(config)
