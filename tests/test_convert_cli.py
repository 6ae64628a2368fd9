"""The .pth command-line converter, on real files written by torch (skipped without it, failed in CI)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import required

from biformer_jax import convert, models
from biformer_jax.convert.__main__ import main as convert_main
from biformer_jax.convert.files import load_converted

torch = required.torch("PyTorch is not installed: the .pth command line needs it")


def micro_state_dict(**kw):
    model = models.create_model("biformer_micro", **kw)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return model, convert.to_torch_state_dict(variables)


def _save_pth(path, obj):
    def to_tensors(sd):
        return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}  # np.array keeps 0-d shapes

    if isinstance(obj, dict) and "model" in obj:
        obj = {k: to_tensors(v) if isinstance(v, dict) else v for k, v in obj.items()}
    else:
        obj = to_tensors(obj)
    torch.save(obj, path)


@pytest.mark.parametrize("layout", ["raw", "training", "ema"])
def test_command_line_converts_a_real_pth(tmp_path, layout, capsys):
    model, sd = micro_state_dict()
    ema_sd = {k: (v + 1 if v.dtype == np.float32 else v) for k, v in sd.items()}
    obj = {"raw": sd, "training": {"model": sd, "epoch": 3}, "ema": {"model": sd, "model_ema": ema_sd}}[layout]
    _save_pth(tmp_path / "ckpt.pth", obj)
    out = tmp_path / "converted"
    argv = ["--model=biformer_micro", f"--input={tmp_path / 'ckpt.pth'}", f"--output={out}"]
    if layout == "ema":
        argv.append("--weights=model_ema")
    assert convert_main(argv) == 0
    variables, meta = load_converted(out)
    assert meta["model"] == "biformer_micro"
    assert meta["weights"] == {"raw": "state_dict", "training": "model", "ema": "model_ema"}[layout]
    expected = ema_sd if layout == "ema" else sd
    back = convert.to_torch_state_dict(variables)
    for k, v in expected.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    x = jax.random.normal(jax.random.key(1), (1, 64, 64, 3))
    assert np.isfinite(jax.jit(model.apply)(variables, x)).all()  # jitted: op by op compiles each op


def test_command_line_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    _, sd = micro_state_dict()
    _save_pth(tmp_path / "micro.pth", sd)
    out = tmp_path / "out"
    # A checkpoint of another model: the mismatches are listed, nothing is written.
    assert convert_main(["--model=biformer_tiny", f"--input={tmp_path / 'micro.pth'}", f"--output={out}"]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "wrong shape" in err and "Nothing was written" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["micro.pth"]
    # A corrupt file.
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert convert_main(["--model=biformer_micro", f"--input={tmp_path / 'bad.pth'}", f"--output={out}"]) == 1
    assert "could not be read" in capsys.readouterr().err and not out.exists()
    # A training checkpoint without the requested entry.
    _save_pth(tmp_path / "train.pth", {"model": sd})
    assert (
        convert_main(
            ["--model=biformer_micro", f"--input={tmp_path / 'train.pth'}", f"--output={out}", "--weights=model_ema"]
        )
        == 1
    )
    assert "--weights=model" in capsys.readouterr().err
    # An existing output is never overwritten.
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert convert_main(["--model=biformer_micro", f"--input={tmp_path / 'micro.pth'}", f"--output={out}"]) == 1
    assert "already exists" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep"
