"""Steady-state throughput of a BiFormer training step or inference, on any backend.

    python benchmarks/throughput.py --model=biformer_tiny --batch=8 --res=224 --mode=train
    python benchmarks/throughput.py --model=biformer_small --mode=infer --attn_impl=chunked --dtype=bfloat16
    # side by side with the official PyTorch model (in a worker process), alternating (CPU):
    python benchmarks/throughput.py --model=biformer_tiny --mode=train --official_repo=/tmp/official_biformer

Compilation is excluded (the step is lowered and compiled first, then run `--warmup` times);
each of `--rounds` rounds times `--steps` steps, and the median step time is reported. With
`--official_repo`, each round times our step and then the official one (run in a worker
process, stepped from here), so both see the same machine load; the ratio is taken per round.
The last line printed is one JSON object:
img_per_s, step_ms, peak_bytes (the compiled program's memory analysis: arguments + outputs
+ temporaries - aliased, where the backend reports it), temp_bytes, backend, peak_rss_bytes
(the process's high-water RSS), and with --official_repo official_img_per_s and speedup.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's biformer_jax first

from timing import DTYPES, CompiledBench, alternate_rounds  # noqa: E402  (benchmarks/timing.py)

from biformer_jax import models  # noqa: E402
from biformer_jax.ops.routed_attention import IMPLS  # noqa: E402
from biformer_jax.tasks.classification import task as classification  # noqa: E402
from biformer_jax.training import train_lib  # noqa: E402
from configs import common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="biformer_tiny", help=f"one of {models.list_models()}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=224, help="square input side")
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--attn_impl", "--attn-impl", default="auto", help=f"routed attention: one of {IMPLS}")
    ap.add_argument("--dwconv_impl", "--dwconv-impl", default="auto", choices=("auto", "conv", "shift"))
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (params stay float32)")
    ap.add_argument("--n_win", "--n-win", type=int, default=None, help="regions per side (default: the variant's)")
    ap.add_argument(
        "--auto_pad", "--auto-pad", action="store_true", help="pad maps n_win does not divide (dense prediction)"
    )
    ap.add_argument(
        "--drop_path", "--drop-path", type=float, default=0.1, help="stochastic depth rate (official default 0.1)"
    )
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--official_repo",
        "--official-repo",
        "--official",
        default=None,
        help="checkout of rayleizhu/BiFormer to time alongside",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the official model")
    return ap.parse_args(argv)


def build_model(args):
    kw = dict(attn_impl=args.attn_impl, dwconv_impl=args.dwconv_impl, dtype=DTYPES[args.dtype])
    if args.n_win is not None:
        kw["n_win"] = args.n_win
    if args.auto_pad:
        kw["auto_pad"] = True
    if args.mode == "train":
        kw["drop_path_rate"] = args.drop_path
    return models.create_model(args.model, **kw)


# The learning-rate schedule's length changes the rate's value, not the compiled step.
STEPS_PER_EPOCH = 1000


def recipe(args):
    """The official recipe of the model's family (configs/common.py): optimiser, mixup/cutmix, EMA."""
    family = "debiformer" if args.model.startswith("debiformer") else "biformer"
    config = common.get_base_config(args.model, drop_path_rate=args.drop_path, recipe=family)
    config.global_batch_size = args.batch
    return config


def build_train(model, images: jax.Array, labels: jax.Array, config, init: bool = True):
    """The trainer's state and step for `model`, as train_lib builds them, jitted with the state donated.

    Returns (state, step, batch): `step(state, batch)` -> (state, metrics) is
    `biformer_jax.tasks.classification.steps.train_step` with the recipe's optimiser, schedule,
    mixup/cutmix and EMA bound (`classification.bind_train_step`), on one device; state is None
    with `init=False`.
    """
    tx, schedule, _ = classification.make_optimizer(config, STEPS_PER_EPOCH)
    state = None
    if init:
        state = jax.jit(train_lib.make_init_fn(config, model, tx, images.shape[1]))(np.int32(config.seed))
    step = jax.jit(classification.bind_train_step(config, model, tx, schedule, model.num_classes), donate_argnums=0)
    return state, step, {"image": images, "label": labels}


class OursBench(CompiledBench):
    """Our step, compiled ahead of time; `step()` runs one and blocks until it is done."""

    def __init__(self, args):
        model = build_model(args)
        rng = np.random.default_rng(0)
        images = jnp.asarray(rng.standard_normal((args.batch, args.res, args.res, 3)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, model.num_classes, args.batch), jnp.int32)
        t0 = time.perf_counter()
        if args.mode == "train":
            state, fn, batch = build_train(model, images, labels, recipe(args))
            self.compiled = fn.lower(state, batch).compile()
            self.state = state

            def run():
                self.state, aux = self.compiled(self.state, batch)
                return aux

        else:
            variables = jax.jit(lambda k: model.init(k, images[:1], train=False))(jax.random.key(0))
            fn = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
            self.compiled = fn.lower(variables, images).compile()

            def run():
                return self.compiled(variables, images)

        self.compile_s = time.perf_counter() - t0
        self._run = run


def main(argv=None) -> dict:
    args = parse_args(argv)
    ours = OursBench(args)
    official = None
    if args.official_repo:
        import official_pytorch

        # Its own process: in ours, XLA's and PyTorch's thread pools contend (see SubprocessBench).
        official = official_pytorch.SubprocessBench(
            args.official_repo,
            args.model,
            args.n_win,
            args.auto_pad,
            args.drop_path,
            args.mode,
            args.batch,
            args.res,
            args.threads,
        )
    ours_s, theirs_s = alternate_rounds(
        ours, official, warmup=args.warmup, rounds=args.rounds, steps=args.steps, batch=args.batch
    )
    step_s = statistics.median(ours_s)
    result = {
        "model": args.model,
        "mode": args.mode,
        "batch": args.batch,
        "res": args.res,
        "attn_impl": args.attn_impl,
        "train_step": "trainer" if args.mode == "train" else None,  # the trainer's step (the only one)
        "dwconv_impl": args.dwconv_impl,
        "dtype": args.dtype,
        "n_win": args.n_win,
        "img_per_s": args.batch / step_s,
        "step_ms": 1e3 * step_s,
        **ours.memory(),
        "compile_s": ours.compile_s,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if official is not None:
        ratios = [t / o for o, t in zip(ours_s, theirs_s)]
        result.update(
            official_peak_rss_bytes=official.close(),
            official_img_per_s=args.batch / statistics.median(theirs_s),
            official_step_ms=1e3 * statistics.median(theirs_s),
            speedup=statistics.median(ratios),
            speedup_per_round=ratios,
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
