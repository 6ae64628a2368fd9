"""Preemption, end to end through train.py subprocesses.

* SIGTERM mid-run: train.py finishes its step, saves, exits 0; the same command resumes and the
  per-step losses equal an uninterrupted run's, bit for bit.
* kill -9 during a checkpoint save: the restart restores the previous complete checkpoint,
  clears the half-written one and finishes with the uninterrupted run's losses.
"""

from __future__ import annotations

import os
import signal

import pytest
from support import subprocess_testlib as sp

pytestmark = pytest.mark.slow  # a few train.py runs of the micro model (compiles shared)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's per-step losses (a train.py process: about 25-30 s in the suite,
    shared by the module's tests)."""
    workdir = tmp_path_factory.mktemp("straight")
    sp.run(sp.train_flags(workdir), sp.env(1), workdir.parent / "straight.log")
    losses = sp.losses(workdir)
    assert sorted(losses) == list(range(1, sp.NUM_STEPS + 1))
    return losses


def test_sigterm_saves_exits_zero_and_the_same_command_resumes(straight, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    args = sp.train_flags(workdir)
    marker = tmp_path / "paused"
    proc = sp.start(args, sp.env(1, HARNESS_PAUSE_AFTER_STEP="2", HARNESS_MARKER=str(marker)), log)
    try:
        sp.wait_for(marker, proc, log)  # step 2 done, step 3 not started
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=sp.RUN_TIMEOUT_S)
    finally:
        sp.kill(proc)
    assert code == 0, sp.tail(log)
    # The step under way when the notice came (3) finished and was saved; nothing after it ran.
    assert sp.checkpoint_steps(workdir)[-1] == 3, sp.tail(log)
    assert sorted(sp.losses(workdir)) == [1, 2, 3]
    assert "Preempted: saved the checkpoint of step 3" in log.read_text()

    sp.run(args, sp.env(1), log)  # the same command again
    assert sp.losses(workdir) == straight
    assert sp.checkpoint_steps(workdir)[-1] == sp.NUM_STEPS


def test_kill_during_save_restarts_from_the_previous_complete_checkpoint(straight, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    args = sp.train_flags(workdir)
    marker = tmp_path / "saving"
    proc = sp.start(args, sp.env(1, HARNESS_HANG_SAVE_STEP="4", HARNESS_MARKER=str(marker)), log)
    try:
        sp.wait_for(marker, proc, log)  # checkpoint 4 written to its temporary directory, not committed
        partial = [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
        assert any("tmp" in name for name in partial), partial
    finally:
        sp.kill(proc)  # kill -9 mid-save
    assert sp.checkpoint_steps(workdir) == [2]

    sp.run(args, sp.env(1), log)  # the same command again
    text = log.read_text()
    assert "Resuming from this workdir's checkpoint at step 2" in text, sp.tail(log)
    assert sp.losses(workdir) == straight
    assert sp.checkpoint_steps(workdir) == [2, 4, 6]
    assert not [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]
