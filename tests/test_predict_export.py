"""predict.py and `python -m biformer_jax.export` on a train.py checkpoint of the quickstart's micro model.

The checkpoint is written by the trainer's own code (train_lib.setup -> initial_state ->
save_train_state: the meta, with its data record, is what train.py writes) without compiling a
train step; the weights are the initial ones, which is all these tests need: every prediction is
compared with model.apply on the same preprocessed pixels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from support import required, train_testlib

from biformer_jax import models, tasks
from biformer_jax.convert import files as convert_files
from biformer_jax.data import sources
from biformer_jax.data.config import IMAGENET_MEAN, IMAGENET_STD
from biformer_jax.export import common
from biformer_jax.export import stablehlo as stablehlo_export
from biformer_jax.tasks.classification import inference
from biformer_jax.training import checkpoint, checkpoint_manager, train_lib

ROOT = train_testlib.ROOT
ODD_SIZE = (45, 29)  # (width, height): neither square nor the model's 32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, compilation_cache):
    config = train_testlib.micro_config()
    path = tmp_path_factory.mktemp("quickstart") / "run"
    run = train_lib.setup(config, tasks.get(config))
    manager = checkpoint_manager.create_manager(str(path), config.checkpoint, best_metric="")
    try:
        state = train_lib.initial_state(config, manager, run.init_fn, run.abstract, run.shardings, task=run.task)
        checkpoint.save_train_state(manager, state, step=1, meta=run.meta)
        manager.wait_until_finished()
    finally:
        manager.close()
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three held-out digits: a 32x32 PNG, a gray 45x29 JPEG (odd size) in a subfolder, an RGBA PNG."""
    root = tmp_path_factory.mktemp("images")
    digits = sources.load_digits(32, 0.2, 0)["test"]
    (root / "sub").mkdir()
    paths = [root / "a.png", root / "sub" / "b.jpg", root / "c.png"]
    Image.fromarray(digits.images[0], "RGB").save(paths[0])
    Image.fromarray(digits.images[1][..., 0], "L").resize(ODD_SIZE, Image.Resampling.BILINEAR).save(paths[1])
    Image.fromarray(digits.images[2], "RGB").convert("RGBA").save(paths[2])
    return root, paths


def _env():
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": train_testlib.enable_compilation_cache(),  # the session's cache
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def _run(args, timeout=600):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _expected_top5(loaded, paths):
    """[(top-5 labels, their probabilities)] per image path, from model.apply (jitted once: op by
    op, every eager op would compile a program of its own)."""
    apply = jax.jit(lambda v, x: loaded.model.apply(v, x, train=False))
    expected = []
    for path in paths:
        x = inference.preprocess(inference.read_image(str(path)), loaded.preprocess)[None]  # (1, 32, 32, 3)
        logits = np.asarray(apply(loaded.variables, x))[0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:5]
        expected.append(([loaded.class_names[i] for i in order], probs[order]))
    return expected


def test_checkpoint_records_its_data(workdir):
    meta = checkpoint.load_meta(workdir)
    assert meta["data"]["class_names"] == [str(i) for i in range(10)]
    loaded = inference.load(str(workdir))
    assert loaded.preprocess == inference.Preprocess(32, 32, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert loaded.preprocess_source == "the checkpoint's data record"


def test_predict_json_on_folder_and_glob_with_odd_size(workdir, images):
    root, paths = images
    # A folder (recursive: finds sub/b.jpg, the odd-size gray JPEG) and a glob; batch 2 makes a padded last batch.
    proc = _run(["predict.py", f"--checkpoint={workdir}", "--batch_size=2", str(root), str(root / "c*.png")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["path"] for r in records] == sorted(str(p) for p in paths) + [str(paths[2])]
    loaded = inference.load(str(workdir))
    for r, (labels, probs) in zip(records, _expected_top5(loaded, [r["path"] for r in records])):
        assert set(r) == {"path", "labels", "probabilities", "classes"}
        assert r["labels"] == labels and [loaded.class_names[c] for c in r["classes"]] == labels
        np.testing.assert_allclose(r["probabilities"], probs, rtol=1e-4, atol=1e-6)
    assert Image.open(paths[1]).size == ODD_SIZE


def test_predict_csv_names_an_unreadable_image_and_exits_1(workdir, images, tmp_path):
    _, paths = images
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    proc = _run(["predict.py", f"--checkpoint={workdir}", "--format=csv", "--top_k=3", str(paths[0]), str(broken)])
    assert proc.returncode == 1
    assert f"cannot read image {broken}" in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split(",") == ["path"] + [f"{c}_{i}" for i in (1, 2, 3) for c in ("label", "probability", "class")]
    assert len(lines) == 2 and lines[1].split(",")[0] == str(paths[0])  # the readable image is still classified
    [(labels, probs)] = _expected_top5(inference.load(str(workdir)), [paths[0]])
    row = lines[1].split(",")
    assert row[1::3] == labels[:3]
    np.testing.assert_allclose([float(v) for v in row[2::3]], probs[:3], rtol=1e-4, atol=1e-6)


def test_predict_bad_input(workdir, images, tmp_path):
    _, paths = images
    no_record = tmp_path / "weights_only"
    (no_record / "variables").mkdir(parents=True)
    proc = _run(["predict.py", f"--checkpoint={no_record}", str(paths[0])])
    assert proc.returncode == 1 and "no model record" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr

    proc = _run(["predict.py", f"--checkpoint={workdir}", "--format=xml", str(paths[0])])
    assert proc.returncode != 0 and "--format" in proc.stderr and "json" in proc.stderr
    proc = _run(["-m", "biformer_jax.export", f"--checkpoint={workdir}", f"--out={tmp_path / 'm'}", "--format=tflite"])
    assert proc.returncode != 0 and "tflite" in proc.stderr and "stablehlo, onnx" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_stablehlo_round_trip_and_standalone_loader(workdir, images, tmp_path):
    loaded = inference.load(str(workdir), model_overrides={"dwconv_impl": "conv"})
    out = tmp_path / "model.stablehlo"
    record = stablehlo_export.export_checkpoint(loaded, str(out))
    errors = record["check"]["relative_error"]
    assert set(errors) == {"batch_1", "batch_3"} and max(errors.values()) <= 1e-6, errors
    assert record["platforms"] == ["cpu", "cuda", "tpu"]
    spec = json.loads((tmp_path / "model.stablehlo.json").read_text())
    assert spec["preprocess"]["image_size"] == 32 and spec["class_names"] == [str(i) for i in range(10)]
    assert sorted(os.listdir(tmp_path)) == ["model.stablehlo", "model.stablehlo.json"]  # no temporaries left

    # The loader file alone (jax, numpy, PIL; this package is never imported) at batch 1 and 3.
    x = common.check_inputs(loaded)
    np.save(tmp_path / "x1.npy", x[0])
    np.save(tmp_path / "x3.npy", x[1])
    script = (
        "import runpy, sys, json, numpy as np\n"
        f"ns = runpy.run_path({str(ROOT / 'biformer_jax' / 'export' / 'loader.py')!r})\n"
        f"p = ns['load']({str(out)!r})\n"
        f"d = {str(tmp_path)!r}\n"
        "for n in (1, 3): np.save(f'{d}/y{n}.npy', p.logits(np.load(f'{d}/x{n}.npy')))\n"
        f"print(json.dumps(p.classify([{str(images[1][1])!r}], top_k=5)))\n"
        "assert not any(m.startswith('biformer_jax') for m in sys.modules), 'the loader imported biformer_jax'\n"
    )
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n, want in zip((1, 3), common.reference_outputs(loaded, x)):
        assert common.relative_error(np.load(tmp_path / f"y{n}.npy"), want) <= 1e-6
    [classified] = json.loads(proc.stdout.strip().splitlines()[-1])
    [(labels, probs)] = _expected_top5(loaded, [images[1][1]])  # the odd-size image, preprocessed by the loader
    assert classified["labels"] == labels
    np.testing.assert_allclose(classified["probabilities"], probs, rtol=1e-4, atol=1e-6)


def test_export_writes_nothing_when_the_check_fails(workdir, tmp_path, monkeypatch):
    loaded = inference.load(str(workdir))
    real = common.reference_outputs
    monkeypatch.setattr(common, "reference_outputs", lambda l, xs: [y * 1.001 for y in real(l, xs)])
    with pytest.raises(common.ExportError, match="does not reproduce model.apply"):
        stablehlo_export.export_checkpoint(loaded, str(tmp_path / "model.stablehlo"))
    assert os.listdir(tmp_path) == []


def test_onnx_round_trip_at_batch_1_and_3(workdir, tmp_path):
    ort = required.onnxruntime()
    from biformer_jax.export import onnx as onnx_export

    loaded = inference.load(str(workdir), model_overrides={"dwconv_impl": "conv"})
    out = tmp_path / "model.onnx"
    record = onnx_export.export_checkpoint(loaded, str(out))
    print(record["check"]["relative_error"])  # measured: the tolerance's margin
    assert max(record["check"]["relative_error"].values()) <= onnx_export.TOLERANCE == record["check"]["tolerance"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = common.check_inputs(loaded, seed=1)
    for xn, want in zip(x, common.reference_outputs(loaded, x)):
        got = session.run(["logits"], {"images": xn})[0]
        assert common.relative_error(got, want) <= onnx_export.TOLERANCE
    assert json.loads((tmp_path / "model.onnx.json").read_text())["input"]["shape"] == [None, 32, 32, 3]
    jax.clear_caches()


def test_onnx_output_check_shortcut_builds_the_same_model(monkeypatch):
    """export.onnx's shortcut for jax2onnx's per-output graph scan (quadratic in the graph) gives
    the same model, consults the scan less, and puts the original back."""
    required.onnxruntime()
    import jax.numpy as jnp
    import jax2onnx
    from jax2onnx.converter import output_binding

    from biformer_jax.export import onnx as onnx_export

    w = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)

    def f(x):
        h = jnp.tanh(x @ w) * 2.0 + 1.0
        return jnp.concatenate([h, jnp.maximum(h, 0.0)], -1).reshape(x.shape[0], 2, 4).sum(1)

    calls = []
    scan = output_binding._value_is_graph_connected

    def counted(ctx, value):
        calls.append(value)
        return scan(ctx, value)

    monkeypatch.setattr(output_binding, "_value_is_graph_connected", counted)

    def convert():
        return jax2onnx.to_onnx(f, [("B", 6)], model_name="f", opset=onnx_export.OPSET).SerializeToString()

    plain, scanned = convert(), len(calls)
    calls.clear()
    with onnx_export._fast_output_checks():
        fast = convert()
    assert fast == plain and scanned > 0 and len(calls) < scanned
    assert output_binding._value_is_graph_connected is counted


def test_onnx_check_refuses_a_tanh_approximate_gelu(workdir, tmp_path, monkeypatch):
    """The ONNX check's tolerance is tight enough to see GELU's tanh approximation in the graph
    (PyTorch's nn.GELU() is the exact erf form): an export traced with it is refused."""
    required.onnxruntime()
    from biformer_jax.export import onnx as onnx_export
    from biformer_jax.models import stages
    from biformer_jax.ops import fused

    loaded = inference.load(str(workdir), model_overrides={"dwconv_impl": "conv"})
    exact = {"gelu": stages.gelu, "gelu_dense": fused.gelu_dense}

    def tanh_gelu(x):
        return jax.nn.gelu(x, approximate=True)

    monkeypatch.setattr(stages, "gelu", tanh_gelu)
    monkeypatch.setattr(fused, "gelu_dense", lambda x, k, b: tanh_gelu(x) @ k + b)
    real_reference = common.reference_outputs

    def exact_reference(loaded, xs):  # model.apply as it is: the exact GELU
        with monkeypatch.context() as m:
            m.setattr(stages, "gelu", exact["gelu"])
            m.setattr(fused, "gelu_dense", exact["gelu_dense"])
            return real_reference(loaded, xs)

    monkeypatch.setattr(common, "reference_outputs", exact_reference)
    with pytest.raises(common.ExportError, match="does not reproduce model.apply") as e:
        onnx_export.export_checkpoint(loaded, str(tmp_path / "model.onnx"))
    print(e.value)  # the tanh GELU's relative errors
    assert os.listdir(tmp_path) == []
    jax.clear_caches()


def test_checkpoints_without_a_data_record(tmp_path):
    """1000 classes: the ImageNet eval transform and TFDS's WordNet ids; otherwise --config is required."""
    for num_classes in (1000, 10):
        model = models.create_model("biformer_micro", num_classes=num_classes)
        kwargs = {"num_classes": num_classes}
        meta = {"format": checkpoint.VARIABLES_FORMAT, "model": "biformer_micro", "model_kwargs": kwargs}
        convert_files.save_converted(tmp_path / str(num_classes), train_testlib.random_variables(model), meta)
    loaded = inference.load(str(tmp_path / "1000"))
    assert loaded.preprocess == inference.Preprocess(224, 256, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
    assert len(loaded.class_names) == 1000 and loaded.class_names[:2] == ["n01440764", "n01443537"]
    with pytest.raises(inference.InferenceInputError, match="--config=configs/<experiment>.py"):
        inference.load(str(tmp_path / "10"))
    loaded = inference.load(str(tmp_path / "10"), config=train_testlib.micro_config())
    assert loaded.class_names == [str(i) for i in range(10)] and loaded.preprocess.image_size == 32
