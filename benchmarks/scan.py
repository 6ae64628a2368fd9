"""Unrolled against scanned blocks (`scan_blocks`) in the training step: compile time, step time
and compiled temporary memory, in one process.

    # the table in the README (issue 27): BiFormer-T/S/B and DeBiFormer-S at 224 (batch 8),
    # BiFormer-S segmentation (sfpn, the whole model) at 512x512 (batch 2)
    python benchmarks/scan.py
    # the rematerialisation policies of the scanned body (stages.SCAN_REMAT) on one model
    python benchmarks/scan.py --cases=biformer_small --remat=none,dots,nothing
    # where the compile time goes: the train-mode forward alone, then with its gradients
    python benchmarks/scan.py --cases=biformer_small --step=forward --rounds=1 --steps=1
    python benchmarks/scan.py --cases=biformer_small --step=grad --rounds=1 --steps=1
    # a smoke run
    python benchmarks/scan.py --cases=biformer_micro --res=64 --rounds=1 --steps=1

For each case the unrolled step and one scanned step per `--remat` policy are built from the
same state: classification is the trainer's own step (`throughput.build_train`: the official
recipe's AdamW, mixup/cutmix, EMA, drop path; `--step=plain`: cross entropy and AdamW, for
machines without the trainer's packages), segmentation `segmentation.seg_train_step`
(mmseg's loss, AdamW). `compile_s` is lower + compile of the step (tracing included; the
initialisation, unrolled in both, is not counted); `temp_bytes` is the compiled program's
temporary memory (XLA's memory analysis). Then, after a warm-up step each, the variants are
timed in alternating rounds (each round times every variant in turn, so all see the same
load) and the median of the per-round medians is reported. One JSON line per variant, then a
Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's biformer_jax first

import segmentation  # noqa: E402  (benchmarks/segmentation.py)
from timing import CompiledBench, time_steps  # noqa: E402

from biformer_jax import models  # noqa: E402
from biformer_jax.models import block_layout  # noqa: E402

SEG_CASE = "sfpn_biformer_small"
DEFAULT_CASES = "biformer_tiny,biformer_small,biformer_base,debiformer_small," + SEG_CASE


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cases", default=DEFAULT_CASES, help="classification and segmentation (sfpn_*, upernet_*) model names"
    )
    ap.add_argument("--remat", default=None, help="scanned policies to time (default: the models' scan_remat)")
    ap.add_argument("--batch", type=int, default=8, help="classification batch (segmentation: --seg_batch)")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--seg_batch", type=int, default=2)
    ap.add_argument("--seg_res", type=int, default=512)
    ap.add_argument("--drop_path", type=float, default=0.1, help="classification stochastic depth rate")
    ap.add_argument(
        "--step",
        choices=("trainer", "plain", "grad", "forward"),
        default="trainer",
        help=(
            "classification: the trainer's step; cross entropy + AdamW (no trainer imports: clu, TFDS); "
            "its value and gradients only (no optimizer); its loss only (train-mode forward)"
        ),
    )
    ap.add_argument(
        "--per_block",
        action="store_true",
        help="also time the scanned step on a per-block state (stacked inside every step: before the trainer "
        "kept scanning models' states stacked)",
    )
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    return ap.parse_args(argv)


PER_BLOCK = "_per_block_state"  # a variant key of this script, not a model argument


def layout(state, kw: dict):
    """The state in the layout the trainer gives the variant: each stage's blocks stacked for a
    scanning model (`block_layout`), unless the variant asks for the per-block one."""
    return block_layout.stack(state) if kw.get("scan_blocks") and not kw.get(PER_BLOCK) else state


def model_kwargs(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != PER_BLOCK}


class Step(CompiledBench):
    """One compiled training step; `step()` runs it on its own copy of the state."""

    def __init__(self, fn, state, *inputs):
        t0 = time.perf_counter()
        self.compiled = fn.lower(state, *inputs).compile()
        self.compile_s = time.perf_counter() - t0
        self.state = jax.tree.map(jnp.copy, state)

        def run():
            self.state, out = self.compiled(self.state, *inputs)
            return out

        self._run = run


def classification_steps(name: str, args, variants: dict[str, dict]) -> dict[str, Step]:
    if args.step != "trainer":
        return plain_steps(name, args, variants)
    import throughput  # benchmarks/throughput.py: the trainer (clu, TFDS, ml_collections)

    ns = argparse.Namespace(
        model=name, batch=args.batch, res=args.res, mode="train", attn_impl="auto", dwconv_impl="auto",
        dtype="float32", n_win=None, auto_pad=False, drop_path=args.drop_path,
    )  # fmt: skip
    base = throughput.build_model(ns)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, args.res, args.res, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, base.num_classes, args.batch), jnp.int32)
    config = throughput.recipe(ns)
    state, _, batch = throughput.build_train(base, images, labels, config)
    out = {}
    for label, kw in variants.items():
        _, fn, _ = throughput.build_train(base.clone(**model_kwargs(kw)), images, labels, config, init=False)
        out[label] = Step(fn, layout(state, kw), batch)
    return out


def plain_loss(params, batch_stats, images, labels, key, model):
    """The plain steps' loss: the train-mode forward (dropout and drop path drawn from `key`) and
    cross entropy; with the BatchNorm updates."""
    rngs = {"dropout": key, "drop_path": jax.random.fold_in(key, 1)}
    variables = {"params": params, "batch_stats": batch_stats}
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates


def plain_train_step(state, images, labels, key, *, model, tx):
    """Cross entropy, gradients, AdamW: the trainer's step without mixup and EMA."""
    params, batch_stats, opt_state = state
    grad_fn = jax.value_and_grad(plain_loss, has_aux=True)
    (loss, updates), grads = grad_fn(params, batch_stats, images, labels, key, model)
    upd, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, upd), updates["batch_stats"], opt_state), loss


def grad_step(state, images, labels, key, *, model, tx):
    """`plain_train_step` without the optimizer: the loss and its gradients, state unchanged."""
    del tx
    params, batch_stats, _ = state
    (loss, _), grads = jax.value_and_grad(plain_loss, has_aux=True)(params, batch_stats, images, labels, key, model)
    return state, (loss, grads)


def forward_step(state, images, labels, key, *, model, tx):
    """`plain_train_step`'s train-mode forward and loss only, state unchanged."""
    del tx
    params, batch_stats, _ = state
    return state, plain_loss(params, batch_stats, images, labels, key, model)[0]


PLAIN_STEPS = {"plain": plain_train_step, "grad": grad_step, "forward": forward_step}


def plain_steps(name: str, args, variants: dict[str, dict]) -> dict[str, Step]:
    model = models.create_model(name, drop_path_rate=args.drop_path)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, args.res, args.res, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, model.num_classes, args.batch), jnp.int32)
    abstract = jax.eval_shape(lambda k: model.init(k, images[:1], train=False), jax.random.key(0))
    variables = jax.tree_util.tree_map_with_path(
        lambda p, s: (
            jnp.ones(s.shape, s.dtype)
            if jax.tree_util.keystr(p).endswith("['var']")
            else jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype)
        ),
        abstract,
    )
    tx = optax.adamw(1e-3, weight_decay=0.05)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    key = jax.random.key(1)
    out = {}
    for label, kw in variants.items():
        bound = functools.partial(PLAIN_STEPS[args.step], model=model.clone(**model_kwargs(kw)), tx=tx)
        fn = jax.jit(bound, donate_argnums=0)
        out[label] = Step(fn, layout(state, kw), images, labels, key)
    return out


def segmentation_steps(name: str, args, variants: dict[str, dict]) -> dict[str, Step]:
    model = models.create_model(name)
    rng = np.random.default_rng(0)
    shape = (args.seg_batch, args.seg_res, args.seg_res)
    images = jnp.asarray(rng.standard_normal((*shape, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, model.num_classes, shape), jnp.int32)
    variables = segmentation.host_variables(model, rng)
    tx = optax.adamw(6e-5, weight_decay=0.01)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    key = jax.random.key(1)
    out = {}
    for label, kw in variants.items():
        module = model.clone(backbone_args=tuple({**model.backbone_config, **model_kwargs(kw)}.items()))
        bound = functools.partial(segmentation.seg_train_step, module=module, part="model", tx=tx)
        fn = jax.jit(bound, donate_argnums=0)
        out[label] = Step(fn, layout(state, kw), images, labels, key)
    return out


def run_case(name: str, args) -> list[dict]:
    policies = args.remat.split(",") if args.remat else [None]
    variants = {"unrolled": dict(scan_blocks=False)}
    for p in policies:
        variants["scanned" if p is None else f"scanned/{p}"] = dict(
            scan_blocks=True, **({} if p is None else dict(scan_remat=p))
        )
        if args.per_block:
            variants["scanned, per-block state" if p is None else f"scanned/{p}, per-block state"] = dict(
                scan_blocks=True, **({} if p is None else dict(scan_remat=p)), **{PER_BLOCK: True}
            )
    seg = name.startswith(("sfpn_", "upernet_"))
    steps = (segmentation_steps if seg else classification_steps)(name, args, variants)
    for s in steps.values():
        s.step()  # warm-up
    times = {label: [] for label in steps}
    for r in range(args.rounds):
        for label, s in steps.items():
            times[label].append(time_steps(s, args.steps))
        print(f"{name} round {r}: " + ", ".join(f"{k} {1e3 * v[-1]:.0f} ms" for k, v in times.items()), flush=True)
    rows = []
    for label, s in steps.items():
        row = {
            "case": name,
            "variant": label,
            "batch": args.seg_batch if seg else args.batch,
            "res": args.seg_res if seg else args.res,
            "compile_s": round(s.compile_s, 2),
            "step_ms": round(1e3 * statistics.median(times[label]), 1),
            "step_ms_per_round": [round(1e3 * t, 1) for t in times[label]],
            **s.memory(),
            "backend": jax.default_backend(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    del steps
    gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| case | variant | compile s | x unrolled | step ms | x unrolled | temp MiB | x unrolled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["case"]: r for r in rows if r["variant"] == "unrolled"}
    for r in rows:
        b = base[r["case"]]
        mib = r["temp_bytes"] / 2**20 if r["temp_bytes"] is not None else float("nan")
        b_mib = b["temp_bytes"] / 2**20 if b["temp_bytes"] is not None else float("nan")
        lines.append(
            f"| {r['case']} {r['res']}px b{r['batch']} | {r['variant']} | {r['compile_s']:.1f} | "
            f"{r['compile_s'] / b['compile_s']:.2f} | {r['step_ms']:.0f} | {r['step_ms'] / b['step_ms']:.2f} | "
            f"{mib:.0f} | {mib / b_mib:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for name in args.cases.split(","):
        rows.extend(run_case(name, args))
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
