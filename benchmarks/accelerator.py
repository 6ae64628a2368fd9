"""One-shot accelerator benchmark (one H100/H200 GPU or a TPU host, within 8 minutes).

    python benchmarks/accelerator.py --out=results/h200 [--official_repo=/path/to/BiFormer]
    bash benchmarks/accelerator.sh results/h200 /path/to/BiFormer     # the same, with a timeout
    python benchmarks/accelerator.py --smoke --out=/tmp/acc            # CPU, micro model, seconds

1. Kernel check on the device: routed attention with impl='pallas' (the Mosaic GPU / TPU
   kernel the lowering platform picks) against 'gather', values and the gradients of q and
   kv, at every BiFormer-S stage shape (224, and 512 with n_win 8), float32 and bfloat16.
2. Per-shape timing of every impl (forward + backward of one stage's attention): the
   fastest per shape is what `AUTO_KERNEL_RULES` in biformer_jax/ops/routed_attention.py
   should encode; the table lists it beside what 'auto' picks today.
3. BiFormer-S (bf16 compute) training steps at batch 128 and inference at batch 256, 224px,
   for gather, masked, chunked, pallas and auto; compiles run in parallel threads.
4. With --official_repo (a checkout of rayleizhu/BiFormer) and torch with CUDA: the official
   BiFormer-S, AMP (float16 autocast + GradScaler, as its main.py), same batches.
5. MFU: model FLOPs (XLA's count of the 'gather' forward; training = 3x forward) per second
   over the measured bf16 matmul peak of the device (an 8192^3 matmul, best of several).

Writes accelerator.json and accelerator.md into --out. Imports jax, flax, optax, numpy and
this package's models/ops (and torch for the official model): no clu, tfds, grain or
ml_collections. `--budget_s` (default 420) stops starting new measurements when spent.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's biformer_jax first
sys.path.insert(0, str(HERE))

from biformer_jax import models  # noqa: E402
from biformer_jax.ops.routed_attention import resolve_impl, routed_attention  # noqa: E402

IMPLS = ("gather", "masked", "chunked", "pallas", "auto")
FORBIDDEN = ("clu", "tensorflow", "tensorflow_datasets", "grain", "ml_collections")
# (regions, Tq, Tkv, heads, topk, head width) of BiFormer-S's routed stages
STAGES = {
    "224_s1": (49, 64, 64, 2, 1, 32),
    "224_s2": (49, 16, 16, 4, 4, 32),
    "224_s3": (49, 4, 4, 8, 16, 32),
    "512_s1": (64, 256, 256, 2, 1, 32),
    "512_s2": (64, 64, 64, 4, 4, 32),
    "512_s3": (64, 16, 16, 8, 16, 32),
}
SMOKE_STAGES = {"s1": (4, 16, 16, 2, 2, 8), "s2": (4, 4, 4, 2, 4, 8)}


def train_state(model, tx, images):
    variables = model.init(jax.random.key(0), images[:1])
    params = variables["params"]
    ema = {"params": params, "batch_stats": variables.get("batch_stats", {})}
    return {"step": jnp.zeros((), jnp.int32), **ema, "opt_state": tx.init(params), "ema": ema}


def make_train_step(model, tx, ema_decay=0.99996, smoothing=0.1):
    """The trainer's step without its clu metrics (biformer_jax.training.steps imports clu):
    label-smoothed cross entropy, AdamW, BatchNorm statistics, parameter/statistics EMA."""

    def step(state, images, labels):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(0), state["step"]))
        rngs = {"dropout": keys[0], "drop_path": keys[1]}
        targets = optax.smooth_labels(jax.nn.one_hot(labels, model.num_classes), smoothing)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state["batch_stats"]}
            logits, upd = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
            return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean(), upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats}
        ema = jax.tree.map(lambda e, p: e * ema_decay + (1 - ema_decay) * p, state["ema"], new)
        return {"step": state["step"] + 1, **new, "opt_state": opt_state, "ema": ema}, loss

    return jax.jit(step, donate_argnums=0)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timed(fn, *args, steps: int, warmup: int = 1) -> float:
    """Median seconds per call of an already compiled fn (results blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak(smoke: bool) -> float:
    """Measured bf16 matmul FLOP/s of the default device."""
    n = 512 if smoke else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a).lower(a).compile()
    return 2 * n**3 / timed(f, a, steps=3 if smoke else 20, warmup=2)


def attention_case(stage, batch, dtype, seed=0):
    p, tq, tkv, heads, topk, width = stage
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, p, tq, heads * width), dtype)
    kv = jax.random.normal(keys[1], (batch, p, tkv, 2 * heads * width), dtype)
    r_idx = jnp.argsort(jax.random.uniform(keys[2], (batch, p, p)), axis=-1)[..., :topk].astype(jnp.int32)
    return q, kv, r_idx, heads


def attention_fn(impl, r_idx, heads):
    def fn(q, kv):
        def loss(q, kv):
            out = routed_attention(q, kv, r_idx, None, num_heads=heads, scale=0.2, impl=impl)
            return jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32))), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(q, kv)
        return out, grads

    return jax.jit(fn)


def check_kernels(stages, batch) -> list[dict]:
    rows = []
    for name, stage in stages.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            q, kv, r_idx, heads = attention_case(stage, batch, dtype)
            got = jax.tree.leaves(attention_fn("pallas", r_idx, heads)(q, kv))
            want = jax.tree.leaves(attention_fn("gather", r_idx, heads)(q.astype(jnp.float32), kv.astype(jnp.float32)))
            errs = [rel_l2(g.astype(jnp.float32), w) for g, w in zip(got, want)]
            # the GPU kernel multiplies in bf16 also for float32 inputs: bf16 bounds throughout
            rows.append(dict(stage=name, dtype=jnp.dtype(dtype).name, err_out=errs[0], err_dq=errs[1],
                             err_dkv=errs[2], ok=bool(max(errs) < 2e-2)))  # fmt: skip
    return rows


def time_stages(stages, batch, steps, impls) -> list[dict]:
    platform = jax.default_backend()
    platform = "cuda" if platform == "gpu" else platform
    rows = []
    for name, stage in stages.items():
        q, kv, r_idx, heads = attention_case(stage, batch, jnp.bfloat16)
        row = dict(stage=name, batch=batch)
        for impl in impls:
            try:
                row[impl + "_ms"] = 1e3 * timed(attention_fn(impl, r_idx, heads), q, kv, steps=steps)
            except Exception as e:  # noqa: BLE001  (a failing impl is reported, not fatal)
                row[impl + "_ms"], row[impl + "_error"] = None, f"{type(e).__name__}: {str(e)[:200]}"
        done = {k[:-3]: v for k, v in row.items() if k.endswith("_ms") and v is not None}
        row["fastest"] = min(done, key=done.get) if done else None
        row["auto_picks"] = resolve_impl("auto", q.shape, kv.shape, stage[4], platform=platform)
        rows.append(row)
    return rows


def model_flops(model, batch, side) -> float:
    """XLA's FLOP count of one eval forward ('gather': custom calls carry no count)."""
    x = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def time_models(args, deadline) -> list[dict]:
    """Compile every (impl, mode) in parallel threads, then time them one after another."""
    name, side = ("biformer_micro", 64) if args.smoke else ("biformer_small", 224)
    rng = np.random.default_rng(0)
    jobs = {}
    for impl in args.impls.split(","):
        model = models.create_model(name, attn_impl=impl, dtype=jnp.bfloat16)
        for mode, batch in (("train", args.train_batch), ("infer", args.infer_batch)):
            images = jnp.asarray(rng.standard_normal((batch, side, side, 3)), jnp.float32)
            if mode == "train":
                labels = jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)
                tx = optax.adamw(5e-4, weight_decay=0.05, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
                state = jax.jit(lambda x, m=model, tx=tx: train_state(m, tx, x))(images[:1])
                jobs[impl, mode] = (make_train_step(model, tx), (state, images, labels), batch)
            else:
                variables = jax.jit(lambda x, m=model: m.init(jax.random.key(0), x))(images[:1])
                infer = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))
                jobs[impl, mode] = (infer, (variables, images), batch)

    def compile_job(key):
        step, call_args, _ = jobs[key]
        t = time.perf_counter()
        compiled = step.lower(*call_args).compile()
        return key, compiled, time.perf_counter() - t

    rows, compiled = [], {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.compile_threads) as pool:
        for fut in concurrent.futures.as_completed([pool.submit(compile_job, k) for k in jobs]):
            try:
                key, exe, secs = fut.result()
                compiled[key] = (exe, secs)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(impl="?", mode="?", error=f"{type(e).__name__}: {str(e)[:300]}"))
    flops = model_flops(models.create_model(name), 1, side)
    for (impl, mode), (step, call_args, batch) in jobs.items():
        row = dict(impl=impl, mode=mode, batch=batch)
        if (impl, mode) not in compiled:
            row["error"] = "did not compile (see the error rows)"
        elif time.perf_counter() > deadline:
            row["skipped"] = "time budget spent"
        else:
            exe, row["compile_s"] = compiled[impl, mode]
            if mode == "train":  # the state is donated: carry it through
                state = call_args[0]

                # The jitted step, not `exe`: the carried state may differ in weak types from the
                # first call's, which the AOT executable refuses; the warmup calls absorb a retrace.
                def run(state, *rest, step=step):
                    return step(state, *rest)[0]

                for _ in range(2):
                    state = jax.block_until_ready(run(state, *call_args[1:]))
                times = []
                for _ in range(args.steps):
                    t = time.perf_counter()
                    state = jax.block_until_ready(run(state, *call_args[1:]))
                    times.append(time.perf_counter() - t)
                sec = float(np.median(times))
            else:
                sec = timed(exe, *call_args, steps=args.steps, warmup=2)
            row["step_ms"] = 1e3 * sec
            row["img_per_s"] = batch / sec
            row["model_tflop_per_s"] = (3 if mode == "train" else 1) * flops * batch / sec / 1e12
        rows.append(row)
    return rows, flops


def _official_step(torch, net, images, labels, mode):
    """One official step: AMP training (float16 autocast + GradScaler, as its main.py) or inference."""
    if mode == "infer":
        net.eval()

        def infer():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                net(images)

        return infer
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cuda")

    def train():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(net(images), labels, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return train


def time_official(args) -> list[dict]:
    """The official PyTorch BiFormer-S with AMP on the CUDA device, same batches."""
    try:
        import torch
    except ImportError:
        return [dict(skipped="torch is not installed")]
    if not torch.cuda.is_available():
        return [dict(skipped="torch sees no CUDA device")]
    import official_pytorch  # benchmarks/official_pytorch.py: loads the checkout (torch only)

    rows = []
    dev = torch.device("cuda")
    for mode, batch in (("train", args.train_batch), ("infer", args.infer_batch)):
        net = official_pytorch.build(args.official_repo, "biformer_small", None, False, 0.15).to(dev)
        images = torch.randn(batch, 3, 224, 224, device=dev)
        labels = torch.randint(0, 1000, (batch,), device=dev)
        step = _official_step(torch, net, images, labels, mode)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        sec = float(np.median(times))
        rows.append(dict(impl="official_pytorch_amp", mode=mode, batch=batch, step_ms=1e3 * sec, img_per_s=batch / sec))
        del net, step
        torch.cuda.empty_cache()
    return rows


def markdown(result) -> str:
    """The JSON's figures as a markdown report."""
    peak, gflop = result["peak_tflop_per_s"], result["model_gflop"]
    lines = [f"# Accelerator benchmark: {result['device']} (jax {result['jax']})", ""]
    lines += [f"bf16 matmul peak (measured): {peak:.1f} TFLOP/s; forward: {gflop:.2f} GFLOP/image", ""]
    lines += ["| impl | mode | batch | img/s | step ms | MFU | x official |", "|---|---|---|---|---|---|---|"]
    official = {r["mode"]: r["img_per_s"] for r in result["official"] if "img_per_s" in r}
    for r in result["models"] + [r for r in result["official"] if "img_per_s" in r]:
        head = f"| {r.get('impl')} | {r.get('mode')} | {r.get('batch')} |"
        if "img_per_s" not in r:
            lines.append(f"{head} {r.get('error') or r.get('skipped')} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
        ratio = f"{r['img_per_s'] / official[r['mode']]:.2f}" if official.get(r["mode"]) else ""
        lines.append(f"{head} {r['img_per_s']:.1f} | {r['step_ms']:.1f} | {mfu} | {ratio} |")
    lines += ["", "Kernel vs gather on the device (rel. L2, out / dq / dkv):", ""]
    for r in result["kernel_check"]:
        errs = f"{r['err_out']:.1e} / {r['err_dq']:.1e} / {r['err_dkv']:.1e}"
        lines.append(f"- {r['stage']} {r['dtype']}: {errs} {'ok' if r['ok'] else 'FAIL'}")
    impls = IMPLS[:-1]
    lines += ["", "Routed attention alone, forward + backward, bf16 (ms):", ""]
    lines += ["| stage | " + " | ".join(impls) + " | fastest | auto picks |", "|---" * (len(impls) + 3) + "|"]
    for r in result["stages"]:
        cells = [f"{r[i + '_ms']:.3f}" if r.get(i + "_ms") is not None else "-" for i in impls]
        lines.append(f"| {r['stage']} | " + " | ".join(cells) + f" | {r['fastest']} | {r['auto_picks']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for accelerator.json and accelerator.md")
    ap.add_argument("--official_repo", "--official-repo", default=None, help="checkout of rayleizhu/BiFormer")
    ap.add_argument("--smoke", action="store_true", help="micro model, tiny batches (CPU CI)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--train_batch", type=int, default=None)
    ap.add_argument("--infer_batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--compile_threads", type=int, default=8)
    ap.add_argument("--budget_s", type=float, default=420.0)
    args = ap.parse_args(argv)
    args.train_batch = args.train_batch or (2 if args.smoke else 128)
    args.infer_batch = args.infer_batch or (2 if args.smoke else 256)
    args.steps = args.steps or (2 if args.smoke else 10)
    start = time.perf_counter()
    deadline = start + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = SMOKE_STAGES if args.smoke else STAGES
    batch = 1 if args.smoke else 16
    result = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), jax=jax.__version__)
    result["peak_tflop_per_s"] = matmul_peak(args.smoke) / 1e12
    result["kernel_check"] = check_kernels(stages, batch)
    stage_impls = [i for i in IMPLS[:-1] if i in args.impls.split(",") or i == "gather"]
    result["stages"] = time_stages(stages, batch * 4, args.steps, stage_impls)
    result["models"], flops = time_models(args, deadline)
    result["model_gflop"] = flops / 1e9
    for r in result["models"]:
        if "model_tflop_per_s" in r:
            r["mfu"] = r["model_tflop_per_s"] / result["peak_tflop_per_s"]
    if args.official_repo and time.perf_counter() < deadline:
        result["official"] = time_official(args)
    else:
        result["official"] = [dict(skipped="no --official_repo" if not args.official_repo else "time budget spent")]
    result["wall_s"] = time.perf_counter() - start
    result["forbidden_modules_loaded"] = sorted({m.split(".")[0] for m in sys.modules} & set(FORBIDDEN))
    (out / "accelerator.json").write_text(json.dumps(result, indent=1))
    (out / "accelerator.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
