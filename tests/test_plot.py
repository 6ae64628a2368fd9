"""biformer_jax.plot: the curves drawn are the logged values, labelled by the sweep's overrides."""

import json
import os

import numpy as np
import pytest

from biformer_jax import plot


def _write_run(path, records):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _records(lr, scale):
    out = [{"step": s, "train/loss": scale / s, "train/learning_rate": lr * s / 30} for s in (10, 20, 30)]
    out.append({"step": 30, "eval/top1": 0.5 * scale, "eval/loss": 1.0})
    out.append({"step": 20, "train/loss": "nan"})  # a later line for a step wins, non-finite is skipped
    return out


def test_sweep_runs_are_overlaid_with_their_overrides(tmp_path):
    root = tmp_path / "sweep"
    _write_run(root / "optim.lr=0.001,seed=0", _records(1e-3, 1.0))
    _write_run(root / "optim.lr=0.003,seed=0", _records(3e-3, 1.5))
    (root / "summary.md").write_text("|run|\n")
    runs = plot.find_runs([str(root)])
    assert [label for label, _ in runs] == ["optim.lr=0.001,seed=0", "optim.lr=0.003,seed=0"]
    fig, panels = plot.plot_runs(runs)
    assert panels == {"train loss": "train/loss", "learning rate": "train/learning_rate", "eval top-1": "eval/top1"}
    by_title = {ax.get_title(): ax for ax in fig.axes}
    loss = by_title["train loss (train/loss)"].get_lines()
    assert [line.get_label() for line in loss] == ["optim.lr=0.001,seed=0", "optim.lr=0.003,seed=0"]
    # step 20's loss was overwritten by "nan": the point is dropped, not drawn as a number.
    np.testing.assert_array_equal(loss[1].get_xdata(), [10, 30])
    np.testing.assert_allclose(loss[1].get_ydata(), [1.5 / 10, 1.5 / 30])
    lr = by_title["learning rate (train/learning_rate)"].get_lines()[0]
    np.testing.assert_allclose(lr.get_ydata(), [1e-3 / 3, 2e-3 / 3, 1e-3])
    top1 = by_title["eval top-1 (eval/top1)"].get_lines()
    np.testing.assert_allclose([line.get_ydata()[0] for line in top1], [0.5, 0.75])


def test_miou_panel_and_cli_writes_png(tmp_path):
    run = tmp_path / "seg"
    _write_run(run, [{"step": 5, "train/loss": 2.0, "eval/mIoU": 0.3}, {"step": 9, "eval/mIoU": 0.4}])
    out = tmp_path / "out" / "c.png"
    assert plot.main([str(run), f"--out={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, panels = plot.plot_runs(plot.find_runs([str(run)]))
    assert panels == {"train loss": "train/loss", "eval mIoU": "eval/mIoU"}
    miou = [ax for ax in fig.axes if ax.get_title().startswith("eval mIoU")][0].get_lines()[0]
    np.testing.assert_allclose(miou.get_ydata(), [0.3, 0.4])


def test_bad_workdirs_say_what_is_wrong(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a train.py workdir or a sweep.py workdir"):
        plot.find_runs([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        plot.find_runs([str(tmp_path / "nope")])
    _write_run(tmp_path / "r", [{"step": 1, "train/grad_norm": 1.0}])
    with pytest.raises(ValueError, match="they logged: train/grad_norm"):
        plot.plot_runs(plot.find_runs([str(tmp_path / "r")]))
    assert plot.main([str(tmp_path / "nope")]) == 1
    assert "error:" in capsys.readouterr().err
