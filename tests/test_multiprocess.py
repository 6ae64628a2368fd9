"""Two train.py processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) equal one process.

Each process has 1 CPU device and reads its own half of every global batch of 16. The pair
trains, checkpointing every 2 steps through Orbax from both processes; after step 2 both get
SIGTERM, agree through JAX's sync service on the step to stop after, save it and exit 0. The
same command resumes them to step 6. Their per-step losses and final evaluation match a single
process driving 2 devices with the same global batch, run straight through, at AdamW's
production eps (1e-8): the losses, the final evaluation and every parameter.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import jax
import numpy as np
import pytest
from support import subprocess_testlib as sp

from biformer_jax.training import checkpoint

pytestmark = pytest.mark.slow  # three launches of train.py (two of them two processes)

# Both sides run the same global computation on a 2-device mesh; only the all-reduces go
# through gloo instead of in-process copies. At the production eps (1e-8) AdamW turns rounding
# noise in analytically-zero gradients into +-lr steps (test_sharded_training), so any difference
# in the sums would show in the parameters. Measured (2-core CPU, jax 0.10.2): the 6 losses, the
# final evaluation and every parameter of the pair equal the single process's exactly.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
EPS = {"optim.eps": 1e-8}  # configs/common.py's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(workdir, tmp_path, name: str, env_vars: dict, **overrides) -> tuple[list, list]:
    port = _free_port()
    procs, logs = [], []
    try:
        for i in range(2):
            logs.append(tmp_path / f"{name}.{i}.log")
            flags = sp.train_flags(workdir, **overrides) + [
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ]
            procs.append(sp.start(flags, env_vars, logs[-1]))
    except BaseException:
        for proc in procs:
            sp.kill(proc)
        raise
    return procs, logs


def _wait_pair(procs, logs, before=None) -> None:
    """Runs `before()` (if given), then waits for both to exit 0; kills both on any failure."""
    try:
        if before is not None:
            before()
        codes = [proc.wait(timeout=sp.RUN_TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            sp.kill(proc)
    assert codes == [0, 0], "\n".join(f"exit {c}:\n{sp.tail(log)}" for c, log in zip(codes, logs))


def _params(workdir) -> dict:
    """The last checkpoint's params, read onto this process's first device (the pair saved from 2 processes)."""
    ref = checkpoint.resolve(workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), checkpoint.saved_shapes(ref)
    )
    return jax.device_get(checkpoint.load_variables(ref, abstract=abstract)["params"])


def _final_line(log) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


def test_two_processes_preempted_resume_and_equal_one_process(tmp_path):
    """Over 60 s (about 1.5-2 min in the suite): five train.py processes (one single, two pairs),
    each starting jax and compiling the step, and the pairs train in lockstep
    over gloo; one process pair cannot stand in for another (the preemption needs both)."""
    single = tmp_path / "single"
    sp.run(sp.train_flags(single, **EPS), sp.env(2), tmp_path / "single.log")

    # The pair: paused after step 2, then SIGTERM to every process (as SLURM / a TPU VM does).
    pair, marker = tmp_path / "pair", tmp_path / "paused"
    env_vars = sp.env(1, HARNESS_PAUSE_AFTER_STEP="2", HARNESS_MARKER=str(marker))
    procs, logs = _start_pair(pair, tmp_path, "first", env_vars, **EPS)

    def preempt():
        sp.wait_for(marker, procs[0], logs[0])  # step 2 done; both wait before step 3
        for proc in procs:
            os.kill(proc.pid, signal.SIGTERM)

    _wait_pair(procs, logs, before=preempt)  # both save and exit 0
    assert sp.checkpoint_steps(pair) == [2, 3]  # the agreed step: the one after the notice
    assert sorted(sp.losses(pair)) == [1, 2, 3]

    _wait_pair(*_start_pair(pair, tmp_path, "resumed", sp.env(1), **EPS))  # the same command: 6 steps
    assert "Resuming from this workdir's checkpoint at step 3" in (tmp_path / "resumed.0.log").read_text()
    assert sp.checkpoint_steps(pair)[-1] == sp.NUM_STEPS

    want, got = sp.losses(single), sp.losses(pair)
    assert sorted(got) == sorted(want) == list(range(1, sp.NUM_STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=LOSS_RTOL)
    # Only process 0 writes the metrics and prints the summary line.
    final_pair, final_single = _final_line(tmp_path / "resumed.0.log"), _final_line(tmp_path / "single.log")
    assert final_pair.keys() == final_single.keys()
    for key, value in final_single.items():
        assert final_pair[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert not [line for line in (tmp_path / "resumed.1.log").read_text().splitlines() if line.startswith('{"eval')]

    # Every parameter, from each run's last checkpoint. Measured: bit-identical (all 103 leaves,
    # the analytically-zero entries of test_sharded_training's list included): same 2-device sums.
    got, want = _params(pair), _params(single)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    diffs = {
        jax.tree_util.keystr(path): float(np.max(np.abs(np.asarray(g) - np.asarray(flat_want[path]))))
        for path, g in jax.tree_util.tree_leaves_with_path(got)
    }
    worst = max(diffs, key=diffs.get)
    print(f"{len(diffs)} parameters: max abs difference {diffs[worst]:.2e} ({worst})")
    assert len(diffs) == len(flat_want) and diffs[worst] <= PARAM_ATOL, f"{worst} differs by {diffs[worst]:.2e}"
