"""Segmentation throughput and memory: whole-image inference and the training step.

    # the issue's figures: backbone inference at the ADE20K test scale, train step at the crop
    python benchmarks/segmentation.py --mode=infer --part=backbone --height=512 --width=2048 \
        --official_repo=/tmp/official_biformer
    python benchmarks/segmentation.py --mode=train --part=model --batch=2 --height=512 --width=512

Ours: `--model`'s backbone (`--part=backbone`: BiFormer_mm / the DeBiFormer segmentation
backbone with `extra_norms`) or the whole segmentation model (`--part=model`), compiled ahead
of time with the attention implementation the trainer picks by default (`--attn_impl=auto`).
The train step of the whole model is mmseg's: cross entropy (ignore index 255) on the logits
bilinearly resized to the labels, plus 0.4 x the auxiliary head's for UperNet, AdamW; of the
backbone alone, the mean square of its four maps, AdamW. `--official_repo` (a checkout of
rayleizhu/BiFormer, fetched outside this repository) times the official `BiFormer` with the
configs' settings (n_win 8, auto_pad, stages + extra LayerNorm2d eps 1e-6; BiFormer models
only; mmseg's heads do not install here, so only `--part=backbone`) in a worker process,
alternating rounds with ours so both see the same load.

Our peak RSS is this process's high-water mark (compilation included); the official one is
its worker's. The last line printed is one JSON object: img_per_s, step_ms, peak_bytes /
temp_bytes (the compiled program's memory analysis), peak_rss_bytes, and with
--official_repo official_img_per_s, official_peak_rss_bytes, speedup, rss_ratio.
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
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's biformer_jax first

from timing import DTYPES, CompiledBench, alternate_rounds  # noqa: E402  (benchmarks/timing.py)

from biformer_jax import models  # noqa: E402
from biformer_jax.host_memory import compile_for_inference  # noqa: E402
from biformer_jax.models.segmentation.backbone import BACKBONES  # noqa: E402
from biformer_jax.ops.resize import resize_bilinear  # noqa: E402

IGNORE_INDEX = 255


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sfpn_biformer_small", help="a segmentation model name")
    ap.add_argument("--part", choices=("backbone", "model"), default="backbone")
    ap.add_argument("--mode", choices=("train", "infer"), default="infer")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--attn_impl", default="auto")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--official_repo", default=None, help="checkout of rayleizhu/BiFormer to time alongside")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the official model")
    return ap.parse_args(argv)


def host_variables(module, rng: np.random.Generator) -> dict:
    """Variables of `module` with random values made on the host, as evaluation gets them.

    eval.py restores a checkpoint into the model's abstract shapes (`jax.eval_shape`): no
    initialisation program is compiled or run. Compiling `module.init` here instead would add
    its compiler memory (~1 GB for BiFormer-S) to the peak RSS that the inference figure reports.
    Weights are N(0, 0.02^2), BatchNorm variances 1; the values do not change the work done.
    """
    abstract = jax.eval_shape(lambda k: module.init(k, jnp.zeros((1, 64, 64, 3)), train=False), jax.random.key(0))

    def value(path, s):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32), s.dtype)

    return jax.tree_util.tree_map_with_path(value, abstract)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """mmseg's CrossEntropyLoss: logits resized to the labels, pixels labelled 255 ignored."""
    logits = resize_bilinear(logits, labels.shape[1:3])
    valid = labels != IGNORE_INDEX
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def seg_train_step(state, images, labels, key, *, module, part, tx):
    """One step: forward in train mode (batch statistics), loss, gradients, AdamW update."""
    params, batch_stats, opt_state = state

    def loss_fn(params):
        rngs = {"dropout": key, "drop_path": jax.random.fold_in(key, 1)}
        variables = {"params": params, "batch_stats": batch_stats}
        if part == "backbone":
            feats, updates = module.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
            return sum(jnp.mean(jnp.square(f.astype(jnp.float32))) for f in feats), updates
        (logits, aux), updates = module.apply(
            variables, images, train=True, return_aux=True, mutable=["batch_stats"], rngs=rngs
        )
        loss = cross_entropy(logits, labels)
        return (loss + 0.4 * cross_entropy(aux, labels) if aux is not None else loss), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    upd, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, upd), updates["batch_stats"], opt_state), loss


class OursSeg(CompiledBench):
    """Our backbone or model, compiled ahead of time; `step()` (inherited) runs one step."""

    def __init__(self, args):
        kw = dict(attn_impl=args.attn_impl, dtype=DTYPES[args.dtype])
        model = models.create_model(args.model, **kw)
        module = model
        if args.part == "backbone":
            module = BACKBONES[model.backbone](**{"dtype": model.dtype, **model.backbone_config})
        rng = np.random.default_rng(0)
        shape = (args.batch, args.height, args.width)
        images = jnp.asarray(rng.standard_normal((*shape, 3)), jnp.float32)
        labels = rng.integers(0, model.num_classes, shape)
        labels = jnp.asarray(np.where(rng.random(shape) < 0.1, IGNORE_INDEX, labels), jnp.int32)
        t0 = time.perf_counter()
        variables = host_variables(module, rng)
        self.train_step = "bench" if args.mode == "train" else None
        if args.mode == "train":
            tx = optax.adamw(6e-5, weight_decay=0.01)
            state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
            step = jax.jit(
                lambda s, x, y, k: seg_train_step(s, x, y, k, module=module, part=args.part, tx=tx), donate_argnums=0
            )
            key = jax.random.key(1)
            self.compiled = step.lower(state, images, labels, key).compile()
            self.state = state

            def run():
                self.state, loss = self.compiled(self.state, images, labels, key)
                return loss

        else:
            # As the segmentation evaluator compiles it (segmentation.inference.Segmenter): ahead
            # of time, then the compiler's freed memory released (biformer_jax.host_memory).
            fn = jax.jit(lambda v, x: module.apply(v, x, train=False))
            self.compiled = compile_for_inference(fn, variables, images)

            def run():
                return self.compiled(variables, images)

        self.compile_s = time.perf_counter() - t0
        self._run = run


def _official_features(net, norms, x):
    outs = []
    for i in range(4):
        x = net.stages[i](net.downsample_layers[i](x))
        outs.append(norms[i](x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))  # LayerNorm2d over channels
    return outs


def _serve_official(conn, repo, backbone_args, mode, batch, height, width, threads) -> None:
    """Worker process: the official BiFormer as BiFormer_mm builds it, stepped on request."""
    try:
        _run_official(conn, repo, backbone_args, mode, batch, height, width, threads)
    except Exception as e:  # tell the parent instead of leaving it waiting
        conn.send(f"error: {type(e).__name__}: {e}")
        raise


def _run_official(conn, repo, backbone_args, mode, batch, height, width, threads) -> None:
    import inspect

    import official_pytorch as op
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cls = op.load_official(repo).BiFormer
    # The config's arguments (ours carry the same names), without our JAX-only options.
    official_args = set(inspect.signature(cls).parameters)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in backbone_args.items() if k in official_args}
    net = cls(**kwargs)
    del net.head, net.norm
    norms = torch.nn.ModuleList([torch.nn.LayerNorm(c, eps=1e-6) for c in net.embed_dim])
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    if mode == "train":
        net.train()
        opt = torch.optim.AdamW([*net.parameters(), *norms.parameters()], lr=6e-5, weight_decay=0.01)
    else:
        net.eval()

    def step():
        if mode == "infer":
            with torch.no_grad():
                _official_features(net, norms, images)
            return
        loss = sum(f.square().mean() for f in _official_features(net, norms, images))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    conn.send("ready")
    while conn.recv() == "step":
        step()
        conn.send("done")
    conn.send(op.peak_rss_bytes())


class OfficialSeg:
    """The official backbone in a spawned worker (see official_pytorch.SubprocessBench)."""

    def __init__(self, args, backbone_args: dict):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        task = (child, args.official_repo, backbone_args, args.mode, args.batch, args.height, args.width, args.threads)
        self._proc = ctx.Process(target=_serve_official, args=task, daemon=True)
        self._proc.start()
        status = self._conn.recv()
        if status != "ready":
            raise RuntimeError(f"the official benchmark worker failed to start ({status})")

    def step(self) -> None:
        self._conn.send("step")
        self._conn.recv()

    def close(self) -> int:
        self._conn.send("stop")
        rss = self._conn.recv()
        self._proc.join(timeout=60)
        return rss


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = models.create_model(args.model)
    official = None
    if args.official_repo:
        if model.backbone != "biformer" or args.part != "backbone":
            raise SystemExit("--official_repo times the official BiFormer backbone: a biformer model, --part=backbone.")
        official = OfficialSeg(args, model.backbone_config)
    ours = OursSeg(args)
    ours_s, theirs_s = alternate_rounds(
        ours, official, warmup=args.warmup, rounds=args.rounds, steps=args.steps, batch=args.batch
    )
    step_s = statistics.median(ours_s)
    result = {
        "model": args.model,
        "part": args.part,
        "mode": args.mode,
        "batch": args.batch,
        "height": args.height,
        "width": args.width,
        "attn_impl": args.attn_impl,
        "dtype": args.dtype,
        "img_per_s": args.batch / step_s,
        "step_ms": 1e3 * step_s,
        **ours.memory(),
        "compile_s": ours.compile_s,
        "backend": jax.default_backend(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }
    if official is not None:
        result["official_peak_rss_bytes"] = official.close()
        result["official_img_per_s"] = args.batch / statistics.median(theirs_s)
        result["official_step_ms"] = 1e3 * statistics.median(theirs_s)
        result["speedup"] = statistics.median([t / o for o, t in zip(ours_s, theirs_s)])
        result["rss_ratio"] = result["peak_rss_bytes"] / result["official_peak_rss_bytes"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
