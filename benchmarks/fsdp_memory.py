"""Per-device bytes of BiFormer-B's training state under FSDP, N = 1, 2, 4, 8 devices.

    python benchmarks/fsdp_memory.py [--config=configs/biformer_b.py] [--devices=1,2,4,8]

For each N, a (data=1, fsdp=N) mesh over N simulated CPU devices; the state (params, AdamW
moments, EMA copies, BatchNorm statistics) is laid out by `sharding.state_shardings` with the
config's `fsdp_min_size`, and a jitted function producing that state with
`out_shardings=...` is compiled from abstract inputs only (nothing runs): by default one that
fills the state's shapes with zeros (seconds), with `--init` the real initialisation (the same
output layout, but it traces the model's forward: minutes on CPU). The table gives XLA's
compiled memory analysis (output bytes per device = the state each device holds) next to the
bytes the layout implies per component, and the ratios to N = 1 (`--no_compile`: the layout's
bytes only).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "biformer_b.py"))
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts N")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument(
        "--init", action="store_true", help="compile the real initialisation (runs the model's forward: minutes on CPU)"
    )
    parser.add_argument("--fsdp_min_size", type=int, default=0, help="0: the config's sharding.fsdp_min_size")
    parser.add_argument(
        "--no_compile", action="store_true", help="only the bytes the layout implies (no compile; seconds)"
    )
    return parser.parse_args()


def main() -> None:
    args = _parse()
    counts = [int(n) for n in args.devices.split(",")]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={max(counts)}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np
    from ml_collections import config_flags  # noqa: F401  (config files import ml_collections)

    from biformer_jax.models import from_config
    from biformer_jax.tasks.classification import task as classification
    from biformer_jax.training import sharding, train_lib

    config = _load_config(args.config)
    # The trainer's model, optimiser and initial state (the schedule's length changes no shape).
    model = from_config.model_from_config(config, args.num_classes)
    tx, _, _ = classification.make_optimizer(config, steps_per_epoch=1000)
    init_fn = train_lib.make_init_fn(config, model, tx, args.image_size)
    seed = np.int32(0)
    abstract = jax.eval_shape(init_fn, seed)
    min_size = args.fsdp_min_size or int(config.sharding.fsdp_min_size)
    n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
    print(
        f"{config.model}: {n_params / 1e6:.2f} M parameters, EMA {'on' if config.ema_decay > 0 else 'off'}, "
        f"fsdp_min_size {min_size}, jax {jax.__version__}, backend {jax.default_backend()}"
    )

    rows = []
    for n in counts:
        mesh = sharding.create_mesh({"data": 1, "fsdp": n}, jax.devices()[:n])
        shardings = sharding.state_shardings(abstract, mesh, min_size)
        compiled_bytes = -1
        if not args.no_compile:
            # Unoptimised LLVM code: the memory layout is the same, the compile much shorter on CPU.
            fn = init_fn if args.init else functools.partial(_zeros_like_state, abstract)
            compiled = (
                jax.jit(fn, out_shardings=shardings)
                .lower(seed)
                .compile(compiler_options={"xla_backend_optimization_level": 0})
            )
            analysis = compiled.memory_analysis()
            compiled_bytes = int(analysis.output_size_in_bytes) if analysis is not None else -1

        def per_device(tree, shardings_tree):
            sizes = jax.tree.map(
                lambda x, s: int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize, tree, shardings_tree
            )
            return sum(jax.tree.leaves(sizes))

        parts = {
            "params": per_device(abstract.params, shardings.params),
            "opt_state": per_device(abstract.opt_state, shardings.opt_state),
            "ema": per_device(
                (abstract.ema_params, abstract.ema_batch_stats), (shardings.ema_params, shardings.ema_batch_stats)
            ),
        }
        rows.append((n, compiled_bytes, parts))

    mib = 2.0**20
    base_compiled = rows[0][1]
    base_layout = rows[0][2]["params"] + rows[0][2]["opt_state"]
    print()
    print(
        "| N (fsdp) | compiled state bytes / device | x of N=1 | params + AdamW / device | x of N=1 | 1/N "
        "| params | AdamW mu+nu | EMA |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, compiled_bytes, parts in rows:
        layout = parts["params"] + parts["opt_state"]
        compiled = "not compiled" if compiled_bytes < 0 else f"{compiled_bytes / mib:,.1f} MiB"
        ratio = "-" if compiled_bytes < 0 else f"{compiled_bytes / base_compiled:.3f}"
        print(
            f"| {n} | {compiled} | {ratio} | {layout / mib:,.1f} MiB | {layout / base_layout:.3f} | {1 / n:.3f} | "
            f"{parts['params'] / mib:,.1f} MiB | {parts['opt_state'] / mib:,.1f} MiB | {parts['ema'] / mib:,.1f} MiB |"
        )


def _zeros_like_state(abstract, seed):
    """A state of the abstract state's shapes and dtypes: the same output layout as the init, compiled in seconds."""
    import jax
    import jax.numpy as jnp

    del seed
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)


def _load_config(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))
    spec.loader.exec_module(module)
    return module.get_config()


if __name__ == "__main__":
    main()
