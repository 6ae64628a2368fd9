"""Load and time the OFFICIAL PyTorch BiFormer (rayleizhu/BiFormer) from a checkout.

Nothing of the official code is in this repository: pass the path of a checkout, e.g.

    git clone https://github.com/rayleizhu/BiFormer /tmp/official_biformer

Its `models/biformer.py` imports fairscale and timm, which are not needed to run the
model; `install_stand_ins` registers small stand-ins of our own for exactly the names it
uses (checkpoint_wrapper, register_model, DropPath, to_2tuple, trunc_normal_, _cfg)
unless the real packages are installed. The training step mirrors the official
engine.py on CPU: soft-target cross entropy on label-smoothed targets, AdamW (weight
decay 0.05 on >1-D parameters only, as timm's create_optimizer), and a parameter/buffer
EMA (timm ModelEma, decay 0.99996).

Side by side with ours, alternating in one process: `benchmarks/throughput.py --official=<dir>`.
Run alone (peak RSS of the official model, one process per measurement):
    python benchmarks/official_pytorch.py --repo=/tmp/official_biformer --model=biformer_small \
        --batch=2 --res=512 --n_win=8 --auto_pad --mode=train
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import time
import types
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 0.05
EMA_DECAY = 0.99996


class _DropPath(nn.Module):
    """Stochastic depth per sample (the behaviour of timm's DropPath)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _to_2tuple(x):
    return tuple(x) if isinstance(x, Iterable) and not isinstance(x, str) else (x, x)


def _trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def install_stand_ins() -> None:
    """Registers stand-ins for the fairscale/timm names models/biformer.py imports (if absent)."""
    try:
        importlib.import_module("fairscale.nn.checkpoint")
    except ImportError:
        # Only used with use_checkpoint_stages, which the benchmarks never set.
        ckpt = _module("fairscale.nn.checkpoint", checkpoint_wrapper=lambda m, *a, **k: m)
        sys.modules["fairscale"] = _module("fairscale")
        sys.modules["fairscale.nn"] = _module("fairscale.nn")
        sys.modules["fairscale.nn.checkpoint"] = ckpt
    try:
        importlib.import_module("timm.models.layers")
        importlib.import_module("timm.models.vision_transformer")
    except ImportError:
        sys.modules.update(
            {
                "timm": _module("timm"),
                "timm.models": _module("timm.models", register_model=lambda fn: fn),
                "timm.models.layers": _module(
                    "timm.models.layers", DropPath=_DropPath, to_2tuple=_to_2tuple, trunc_normal_=_trunc_normal_
                ),
                "timm.models.vision_transformer": _module("timm.models.vision_transformer", _cfg=lambda **kw: dict(kw)),
            }
        )


def load_official(repo: str):
    """The official `models.biformer` module from a checkout of rayleizhu/BiFormer."""
    root = Path(repo).expanduser().resolve()
    if not (root / "models" / "biformer.py").is_file() or not (root / "ops" / "bra_legacy.py").is_file():
        raise FileNotFoundError(
            f"{root} is not a checkout of rayleizhu/BiFormer (models/biformer.py and ops/bra_legacy.py are "
            "needed): run `git clone https://github.com/rayleizhu/BiFormer <dir>` and pass --official_repo=<dir>."
        )
    install_stand_ins()
    sys.path.insert(0, str(root))
    return importlib.import_module("models.biformer")


def build(repo: str, model: str, n_win: int | None, auto_pad: bool, drop_path: float) -> nn.Module:
    mod = load_official(repo)
    kwargs = {"drop_path_rate": drop_path}
    if n_win is not None:
        kwargs["n_win"] = n_win
    if auto_pad:
        kwargs["auto_pad"] = True
    return getattr(mod, model)(**kwargs)


class OfficialBench:
    """The official model with its training step (fwd + bwd + AdamW + EMA) or eval forward."""

    def __init__(self, net: nn.Module, mode: str, batch: int, res: int, num_classes: int = 1000):
        self.net, self.mode = net, mode
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch, 3, res, res, generator=gen)
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        off = LABEL_SMOOTHING / num_classes
        self.targets = torch.full((batch, num_classes), off)
        self.targets.scatter_(1, labels[:, None], 1.0 - LABEL_SMOOTHING + off)
        if mode == "train":
            net.train()
            skip = set(getattr(net, "no_weight_decay", lambda: set())())
            decay, no_decay = [], []
            for name, p in net.named_parameters():
                (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
            self.opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                lr=5e-4,
                betas=(0.9, 0.999),
                eps=1e-8,
            )
            self.ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            net.eval()

    def step(self) -> None:
        if self.mode == "infer":
            with torch.no_grad():
                self.net(self.images)
            return
        logits = self.net(self.images)
        loss = torch.sum(-self.targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for k, v in self.net.state_dict().items():
                e = self.ema[k]
                if e.dtype.is_floating_point:
                    e.mul_(EMA_DECAY).add_(v, alpha=1.0 - EMA_DECAY)
                else:
                    e.copy_(v)


def _serve(conn, repo, model, n_win, auto_pad, drop_path, mode, batch, res, threads) -> None:
    """Worker process: builds the official bench, then runs one step per request."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bench = OfficialBench(build(repo, model, n_win, auto_pad, drop_path), mode, batch, res)
    conn.send("ready")
    while conn.recv() == "step":
        bench.step()
        conn.send("done")
    conn.send(peak_rss_bytes())


class SubprocessBench:
    """The official bench in its own process, stepped from ours one step at a time.

    In one process with JAX, XLA's CPU thread pool and PyTorch's OpenMP threads contend: the
    official step measured 10x slower there than alone (43 s vs 4.8 s, BiFormer-T train,
    batch 8). A worker process keeps the two runtimes apart while the caller still alternates
    them, so both see the same machine load.
    """

    def __init__(self, repo, model, n_win, auto_pad, drop_path, mode, batch, res, threads):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        args = (child, repo, model, n_win, auto_pad, drop_path, mode, batch, res, threads)
        self._proc = ctx.Process(target=_serve, args=args, daemon=True)
        self._proc.start()
        if self._conn.recv() != "ready":
            raise RuntimeError("the official benchmark worker failed to start")

    def step(self) -> None:
        self._conn.send("step")
        self._conn.recv()

    def close(self) -> int:
        """Stops the worker; returns its peak RSS in bytes."""
        self._conn.send("stop")
        rss = self._conn.recv()
        self._proc.join(timeout=30)
        return rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--repo", "--official", "--official_repo", dest="repo", required=True, help="checkout of rayleizhu/BiFormer"
    )
    ap.add_argument("--model", default="biformer_tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--mode", choices=("train", "infer"), default="infer")
    ap.add_argument("--n_win", "--n-win", type=int, default=None)
    ap.add_argument("--auto_pad", "--auto-pad", action="store_true")
    ap.add_argument("--drop_path", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build(args.repo, args.model, args.n_win, args.auto_pad, args.drop_path)
    bench = OfficialBench(net, args.mode, args.batch, args.res)
    for _ in range(args.warmup):
        bench.step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        bench.step()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    print(
        json.dumps(
            {
                "impl": "official_pytorch",
                "model": args.model,
                "mode": args.mode,
                "batch": args.batch,
                "res": args.res,
                "img_per_s": args.batch / step_s,
                "step_ms": 1e3 * step_s,
                "peak_rss_bytes": peak_rss_bytes(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
