"""Memory of a training step per routed-attention implementation, one process each.

    python benchmarks/memory.py --model=biformer_small --res=512 --n_win=8 --auto_pad --batch=2 \
        --impls=gather,chunked [--official=/tmp/official_biformer]

For each implementation, runs `benchmarks/throughput.py --mode=train` (one warm-up step and
one timed step) in its own process, so each peak RSS is that implementation's alone, and
collects its compiled temporary bytes (XLA's memory analysis of the whole train step) and
the process's peak RSS. With --official, also runs `benchmarks/official_pytorch.py` on the
same configuration in its own process (peak RSS of the official PyTorch training step).
The last line printed is one JSON object: per implementation temp_bytes, peak_bytes,
peak_rss_bytes and img_per_s; temp_ratio = temp_bytes[second impl] / temp_bytes[first];
and the official peak_rss_bytes where run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def run(cmd: list[str]) -> dict:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{cmd[1]} failed with exit status {proc.returncode}")
    result = last_json(proc.stdout)
    print(json.dumps(result), flush=True)
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="biformer_small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--n_win", "--n-win", type=int, default=8)
    ap.add_argument("--auto_pad", "--auto-pad", action="store_true")
    ap.add_argument("--impls", default="gather,chunked", help="comma-separated attention implementations")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--official", "--official_repo", default=None, help="checkout of rayleizhu/BiFormer")
    args = ap.parse_args(argv)
    common = [f"--model={args.model}", f"--batch={args.batch}", f"--res={args.res}", f"--n_win={args.n_win}"]
    common += ["--mode=train"] + (["--auto_pad"] if args.auto_pad else [])
    result = {"model": args.model, "batch": args.batch, "res": args.res, "n_win": args.n_win, "impls": {}}
    impls = args.impls.split(",")
    for impl in impls:
        r = run(
            [sys.executable, str(HERE / "throughput.py"), *common, f"--attn_impl={impl}", f"--dtype={args.dtype}"]
            + ["--warmup=1", "--rounds=1", "--steps=1"]
        )
        keys = ("temp_bytes", "peak_bytes", "peak_rss_bytes", "img_per_s", "compile_s", "train_step")
        result["impls"][impl] = {k: r.get(k) for k in keys}
    if len(impls) >= 2:
        first, second = (result["impls"][i]["temp_bytes"] for i in impls[:2])
        if first and second is not None:
            result["temp_ratio"] = second / first
    if args.official:
        r = run(
            [sys.executable, str(HERE / "official_pytorch.py"), f"--repo={args.official}", *common]
            + ["--warmup=1", "--steps=1"]
        )
        result["official"] = {k: r.get(k) for k in ("peak_rss_bytes", "img_per_s")}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
