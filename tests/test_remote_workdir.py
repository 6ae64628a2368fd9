"""A gs:// workdir end to end, offline: train.py, a resumed train.py, eval.py, predict.py, the plot, export.

The programs run as subprocesses against tests/support/fake_gcs.py, an in-memory GCS that
every gs:// client in the stack reaches as it would reach Google's: Orbax's arrays through
TensorStore's gcs driver, etils.epath and the TensorBoard writer through TensorFlow's GCS
filesystem, Orbax's bucket lookup through google-cloud-storage. Each runs from its own empty
directory, which must still be empty afterwards: a workdir path turned local (`os.path.abspath`
makes `<cwd>/gs:/bucket/...`) or a file written with `open`/`os.makedirs` shows up there (or
fails the run), and the store must hold every file the run is expected to write.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import subprocess_testlib
from support.fake_gcs import FakeGcs

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "biformer-test-bucket"
WORKDIR = f"gs://{BUCKET}/runs/quickstart"
PREFIX = "runs/quickstart/"
TIMEOUT_S = 600
TRAIN, EVAL, PREDICT = (str(ROOT / f"{name}.py") for name in ("train", "eval", "predict"))


@pytest.fixture
def gcs(tmp_path):
    with FakeGcs(tmp_path) as server:
        yield server


def _run(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> str:
    """Runs python `args` from `cwd`; returns the output, failing with its tail on a non-zero exit."""
    cwd.mkdir()
    with open(log, "wb") as f:
        code = subprocess.run(
            [sys.executable, *args],
            env=env,
            cwd=cwd,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=TIMEOUT_S,
            check=False,
        ).returncode
    output = log.read_text(errors="replace")
    assert code == 0, f"{args[0]} exited {code}:\n{subprocess_testlib.tail(log)}"
    assert sorted(p.name for p in cwd.iterdir()) == [], f"{args[0]} wrote into its working directory"
    return output


def _steps(gcs: FakeGcs) -> list[int]:
    names = gcs.names(BUCKET, PREFIX + "checkpoints/")
    return sorted({int(n.split("/")[3]) for n in names if n.split("/")[3].isdigit()})


def test_train_resume_and_eval_on_a_gs_workdir(gcs, tmp_path):
    """Over 60 s (about 1.5-2 min in the suite): seven command-line programs in a row (train,
    resumed train, eval, predict, plot, export), each a process that starts jax and compiles,
    all on the one gs:// workdir the previous one wrote: one end-to-end run, not seven tests."""
    env = {**subprocess_testlib.env(num_devices=1), **gcs.env(tmp_path / "gcloud")}
    (tmp_path / "gcloud").mkdir()
    flags = subprocess_testlib.train_flags(WORKDIR, eval_every_steps=2, **{"checkpoint.keep": 2})

    out = _run([TRAIN, *flags, "--config.num_train_steps=2"], env, tmp_path / "cwd1", tmp_path / "train1.log")
    assert "Resuming" not in out
    assert _steps(gcs) == [2]

    out = _run([TRAIN, *flags, "--config.num_train_steps=4"], env, tmp_path / "cwd2", tmp_path / "train2.log")
    assert "Resuming from this workdir's checkpoint at step 2." in out
    assert _steps(gcs) == [2, 4]

    names = gcs.names(BUCKET, PREFIX)
    metrics = [json.loads(line) for line in gcs.read(BUCKET, PREFIX + "metrics.jsonl").decode().splitlines()]
    assert {r["step"] for r in metrics if "train/loss" in r} == {1, 2, 3, 4}
    assert {r["step"] for r in metrics if "eval/top1" in r} == {2, 4}
    assert sum("events.out.tfevents" in n for n in names) == 2, names  # TensorBoard: one file per run
    for step in (2, 4):
        assert f"{PREFIX}checkpoints/{step}/_CHECKPOINT_METADATA" in names
        assert any(n.startswith(f"{PREFIX}checkpoints/{step}/train/") for n in names), names

    config = f"--config={ROOT / 'configs' / 'quickstart.py'}:runlocal"
    out = _run([EVAL, config, f"--checkpoint={WORKDIR}"], env, tmp_path / "cwd3", tmp_path / "eval.log")
    printed = json.loads(out.strip().splitlines()[-1])
    written = json.loads(gcs.read(BUCKET, f"{PREFIX}checkpoints/4/eval_results.json"))
    assert written == printed
    assert "could not write" not in out
    assert printed["checkpoint"] == f"{WORKDIR}/checkpoints/4"

    image = tmp_path / "digit.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    out = _run([PREDICT, f"--checkpoint={WORKDIR}", str(image)], env, tmp_path / "cwd4", tmp_path / "predict.log")
    assert len(json.loads(out.strip().splitlines()[-1])["classes"]) == 5  # the top 5 of the 10 digits

    _run(["-m", "biformer_jax.plot", WORKDIR], env, tmp_path / "cwd5", tmp_path / "plot.log")
    assert gcs.read(BUCKET, PREFIX + "curves.png")[:8] == b"\x89PNG\r\n\x1a\n"

    export = ["-m", "biformer_jax.export", f"--checkpoint={WORKDIR}", f"--out={WORKDIR}/export/model.stablehlo"]
    _run(export, env, tmp_path / "cwd6", tmp_path / "export.log")
    spec = json.loads(gcs.read(BUCKET, PREFIX + "export/model.stablehlo.json"))
    assert spec["checkpoint"].startswith(WORKDIR) and len(gcs.read(BUCKET, PREFIX + "export/model.stablehlo")) > 1000

    assert not [n for n in gcs.names(BUCKET) if "tmp" in n]  # every temporary renamed or removed
    assert gcs.unhandled == []
    assert not list(tmp_path.rglob("gs:*")) and not (ROOT / "gs:").exists()
