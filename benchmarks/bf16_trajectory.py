"""The quickstart's loss trajectory in bfloat16 compute vs float32: how far apart they are.

    python benchmarks/bf16_trajectory.py --workdir=/tmp/bf16_vs_f32 [--num_epochs=30] [--log_every=10]

Trains configs/quickstart.py twice from the same seed and data order, once with
`compute_dtype="float32"` and once with `"bfloat16"` (parameters, optimiser state and BatchNorm
statistics float32 in both), then prints the logged train losses side by side at a few steps,
their max and mean absolute difference over every logged step, and both final evaluations.
Existing run directories under --workdir are resumed/reused, not overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_epochs", type=int, default=0, help="0: the quickstart's own (30)")
    parser.add_argument("--log_every", type=int, default=10, help="log the train loss every this many steps")
    args = parser.parse_args()

    import numpy as np

    from biformer_jax import tasks
    from biformer_jax.training import metrics as metrics_lib
    from biformer_jax.training import train_lib
    from configs import quickstart

    losses, finals, times = {}, {}, {}
    for dtype in ("float32", "bfloat16"):
        config = quickstart.get_config()
        config.unlock()
        config.compute_dtype = dtype
        config.log_every_steps = args.log_every
        if args.num_epochs:
            config.num_epochs = args.num_epochs
        config.lock()
        workdir = os.path.join(args.workdir, dtype)
        t0 = time.perf_counter()
        finals[dtype] = train_lib.train_and_evaluate(config, workdir, tasks.get(config))
        times[dtype] = time.perf_counter() - t0
        records = metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILE))
        losses[dtype] = {s: r["train/loss"] for s, r in records.items() if "train/loss" in r}

    steps = sorted(set(losses["float32"]) & set(losses["bfloat16"]))
    f32 = np.array([losses["float32"][s] for s in steps])
    bf16 = np.array([losses["bfloat16"][s] for s in steps])
    diff = np.abs(bf16 - f32)
    print("\n| step | loss float32 | loss bfloat16 | abs diff |\n| --- | --- | --- | --- |")
    for i in sorted({0, len(steps) // 4, len(steps) // 2, 3 * len(steps) // 4, len(steps) - 1}):
        print(f"| {steps[i]} | {f32[i]:.4f} | {bf16[i]:.4f} | {diff[i]:.4f} |")
    print(
        f"\nlogged steps: {len(steps)} (every {args.log_every}, each the mean loss since the last log); "
        f"max |diff| {diff.max():.4f} (step {steps[int(diff.argmax())]}), mean |diff| {diff.mean():.4f}, "
        f"mean |diff| / mean loss {diff.mean() / f32.mean():.3%}"
    )
    for dtype in ("float32", "bfloat16"):
        print(f"{dtype}: final {json.dumps(finals[dtype], sort_keys=True)}, wall {times[dtype]:.0f} s")


if __name__ == "__main__":
    main()
