"""Failures that must not lose work or hide their cause (issue 16, items 4, 5, 7).

eval.py prints its result before writing it (and survives a checkpoint it cannot write to),
a sweep with a failed run says so in its exit status and keeps the traceback, and a corrupt
image file of a folder dataset is named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support import train_testlib

from biformer_jax import data, models, tasks
from biformer_jax.convert import files as convert_files
from biformer_jax.data import sources
from biformer_jax.training import sweeps


@pytest.fixture(autouse=True, scope="module")
def _compile_cache():
    train_testlib.enable_compilation_cache()


def _env():
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": train_testlib.enable_compilation_cache(),
        "PYTHONPATH": str(train_testlib.ROOT),
    }


def _micro_config_file(tmp_path):
    config_file = tmp_path / "micro.py"  # the tests' micro config, so the eval compile is a cache hit
    config_file.write_text(
        f"import sys\nsys.path.insert(0, {str(train_testlib.ROOT / 'tests')!r})\n"
        "from support import train_testlib\n\n\ndef get_config():\n    return train_testlib.micro_config()\n"
    )
    return config_file


# ---------------------------------------------------------------------------------------
# Item 4: eval.py prints, then writes where it can


def test_eval_py_prints_its_result_even_where_it_cannot_write_it(tmp_path):
    model = models.create_model("biformer_micro", depth=(1, 1, 1, 1), num_classes=10)
    ckpt = tmp_path / "shared_weights"
    meta = {
        "format": "biformer_jax.variables/1",
        "model": "biformer_micro",
        "model_kwargs": {"depth": [1, 1, 1, 1], "num_classes": 10},
    }
    convert_files.save_converted(ckpt, train_testlib.random_variables(model, seed=1), meta)
    # A place nobody can write to, root included (tests may run as root, which ignores chmod):
    # below a regular file. The same code path as a read-only or removed checkpoint directory.
    (tmp_path / "a_file").write_text("")

    def run(output):
        return subprocess.run(
            [
                sys.executable,
                "eval.py",
                f"--config={_micro_config_file(tmp_path)}",
                f"--checkpoint={ckpt}",
                f"--output={output}",
            ],
            cwd=train_testlib.ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )

    proc = run(tmp_path / "a_file" / "results.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["top1"] <= 1.0 and result["checkpoint"] == str(ckpt)
    assert f"warning: could not write the results to {tmp_path / 'a_file' / 'results.json'}" in proc.stderr
    assert "--output" in proc.stderr and "Traceback" not in proc.stderr
    assert not (ckpt / tasks.EVAL_RESULTS_FILE).exists()

    proc = run(tmp_path / "results.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "results.json").read_text()) == printed == result
    assert "warning" not in proc.stderr


def test_eval_py_reports_a_checkpoint_of_the_wrong_format_in_one_line(tmp_path):
    ckpt = tmp_path / "odd"
    ckpt.mkdir()
    (ckpt / "biformer_jax.json").write_text(json.dumps({"format": "something.else/9", "model": "biformer_micro"}))
    proc = subprocess.run(
        [sys.executable, "eval.py", f"--config={_micro_config_file(tmp_path)}", f"--checkpoint={ckpt}"],
        cwd=train_testlib.ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {ckpt}: checkpoint format 'something.else/9', expected 'biformer_jax.variables/1'."
    ]


def test_write_results_is_complete_or_absent(tmp_path):
    target = tasks.write_results(tmp_path, {"top1": 0.5})
    assert target == tmp_path / tasks.EVAL_RESULTS_FILE and json.loads(target.read_text()) == {"top1": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == [tasks.EVAL_RESULTS_FILE]  # no temporary left
    tasks.write_results(tmp_path, {"top1": 0.75})  # a second evaluation replaces the first
    assert json.loads(target.read_text()) == {"top1": 0.75}
    assert sorted(p.name for p in tmp_path.iterdir()) == [tasks.EVAL_RESULTS_FILE]
    with pytest.raises(OSError):
        tasks.write_results(tmp_path / "missing_dir" / "r.json", {"top1": 0.5})


# ---------------------------------------------------------------------------------------
# Item 5: sweeps report failures


def _fails_for_seed_one(config, workdir):
    if config.seed == 1:
        raise RuntimeError("simulated failure in run seed=1\nsecond line")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 4, "eval/top1": 0.75, "eval/loss": 0.5}) + "\n")


def test_a_failed_sweep_run_keeps_its_traceback_and_the_summary_names_it(tmp_path):
    config = train_testlib.micro_config()
    rows = sweeps.run_sweep(config, [{"seed": 0}, {"seed": 1}], str(tmp_path), _fails_for_seed_one)
    assert rows[0]["status"] == "ok" and rows[0]["eval/top1"] == 0.75
    failure = tmp_path / "seed=1" / sweeps.FAILURE_FILE
    assert rows[1]["status"] == (f"failed: RuntimeError: simulated failure in run seed=1 (traceback in {failure})")
    text = failure.read_text()
    assert text.startswith("Traceback (most recent call last):") and "_fails_for_seed_one" in text
    assert "second line" in text
    assert str(failure) in (tmp_path / "summary.md").read_text()


def test_sweep_py_exits_non_zero_when_a_run_failed(tmp_path):
    sweep_file = tmp_path / "sweep.py"
    sweep_file.write_text("def get_sweep(h):\n    return h.sweep('config.optim.lr', [1e-3, -1.0])\n")
    harness = tmp_path / "fake_sweep.py"  # sweep.py with a trainer that fails for lr < 0 (no compile)
    harness.write_text(
        "import json, os, runpy, sys\n"
        "from biformer_jax.training import train_lib\n"
        "def fake(config, workdir, task):\n"
        "    if config.optim.lr < 0:\n"
        "        raise ValueError('lr must be positive')\n"
        "    os.makedirs(workdir, exist_ok=True)\n"
        "    open(os.path.join(workdir, 'metrics.jsonl'), 'w').write(json.dumps({'step': 1, 'eval/top1': 1.0}))\n"
        "train_lib.train_and_evaluate = fake\n"
        f"sys.argv[0] = {str(train_testlib.ROOT / 'sweep.py')!r}\n"
        f"runpy.run_path({str(train_testlib.ROOT / 'sweep.py')!r}, run_name='__main__')\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(harness),
            "--config=configs/quickstart.py",
            f"--sweep={sweep_file}",
            f"--workdir={tmp_path / 'root'}",
        ],
        cwd=train_testlib.ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "error: 1 of 2 runs failed (optim.lr=-1)" in proc.stderr
    assert "failure.txt" in proc.stdout  # the summary table names the file
    assert "ValueError: lr must be positive" in (tmp_path / "root" / "optim.lr=-1" / "failure.txt").read_text()


# ---------------------------------------------------------------------------------------
# Item 7: a corrupt image names its file


def _folder_with_bad_files(root):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            d = root / split / name
            d.mkdir(parents=True)
            for k in range(2):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8), "RGB").save(d / f"{k}.jpg")
    full = (root / "train" / "cat" / "0.jpg").read_bytes()
    (root / "train" / "cat" / "1.jpg").write_bytes(full[: len(full) // 3])  # truncated mid-upload
    (root / "train" / "dog" / "0.jpg").write_text("<html>403 Forbidden</html>")  # not an image at all


@pytest.mark.parametrize("index, bad", [(1, "cat/1.jpg"), (2, "dog/0.jpg")], ids=["truncated", "not_an_image"])
def test_a_corrupt_image_fails_naming_its_file(tmp_path, index, bad):
    _folder_with_bad_files(tmp_path)
    cfg = data.default_config()
    cfg.name, cfg.folder = "folder", str(tmp_path)
    source, _ = sources.open_source(cfg, "train")
    assert source.read([0])[0][1] == 0  # the good files read
    expected = rf"Cannot decode the image file {tmp_path}/train/{bad} .*bad_images"
    with pytest.raises(sources.BadImageError, match=expected):
        source.read([index])


def test_a_corrupt_image_is_skipped_by_choice_with_its_path_logged(tmp_path, caplog):
    _folder_with_bad_files(tmp_path)
    cfg = data.default_config()
    cfg.name, cfg.folder, cfg.bad_images = "folder", str(tmp_path), "skip"
    cfg.image_size, cfg.eval_resize, cfg.threads, cfg.prefetch = 16, 18, 1, 1
    source, _ = sources.open_source(cfg, "train")
    with caplog.at_level("WARNING"):
        (img1, label1), (img2, label2) = source.read([1, 2])
    # cat/1 (truncated) -> dog/0 (not an image) -> dog/1; dog/0 -> dog/1.
    assert (label1, label2) == (1, 1) and img1.tobytes() == img2.tobytes()
    assert f"{tmp_path}/train/cat/1.jpg" in caplog.text and f"{tmp_path}/train/dog/0.jpg" in caplog.text
    batch = next(data.train_iterator(cfg, seed=0, start_step=0, global_batch_size=4, process_index=0, process_count=1))
    assert batch["image"].shape == (4, 16, 16, 3)
    cfg.bad_images = "ignore"
    with pytest.raises(ValueError, match="bad_images 'ignore' is not one of"):
        sources.open_source(cfg, "train")
