"""The parity data of `../shared/golden`: rebuild each case's weights from its manifest.

The recipe (shared/golden/README.md): for every [name, shape, dtype] of the manifest,
rng = default_rng(crc32(salt + name)); running stats, 1-D weights and biases and >= 2-D
kernels each have their own distribution; the input and cotangent come from
crc32(salt + "input") / crc32(salt + "cotangent").
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np

from support import required

GOLDEN_DIR = Path(os.environ.get("BIFORMER_GOLDEN_DIR", Path(__file__).resolve().parents[3] / "shared" / "golden"))

# case -> (create_model name, official constructor kwargs), as listed in golden/README.md.
_OPTS = dict(depth=[1, 1, 1, 1], embed_dim=[32, 64, 128, 256], qk_dims=[32, 64, 128, 256], num_classes=10)
CASES: dict[str, tuple[str, dict]] = {
    "biformer_tiny": ("biformer_tiny", {}),
    "biformer_small": ("biformer_small", {}),
    "biformer_base": ("biformer_base", {}),
    "biformer_tiny_train": ("biformer_tiny", {"drop_path_rate": 0.0}),
    "opts_a": (
        "biformer",
        dict(
            _OPTS,
            head_dim=16,
            topks=[2, 4, -1, 0],
            kv_downsample_mode="ada_avgpool",
            kv_per_wins=[2, 2, -1, -1],
            mlp_dwconv=True,
            layer_scale_init_value=0.5,
            mlp_ratios=[2, 2, 2, 2],
        ),
    ),
    "opts_b": (
        "biformer",
        dict(
            _OPTS,
            depth=[1, 1, 2, 1],
            head_dim=8,
            qk_dims=[16, 32, 64, 128],
            topks=[4, 4, 8, -2],
            kv_downsample_mode="avgpool",
            kv_downsample_ratios=[4, 2, 1, 1],
            soft_routing=True,
            param_routing=True,
            diff_routing=True,
            pre_norm=False,
            param_attention="qkv",
            mlp_ratios=[3, 3, 3, 3],
        ),
    ),
    "opts_c_autopad": (
        "biformer",
        dict(
            depth=[1, 2, 1, 1],
            embed_dim=[32, 64, 96, 128],
            head_dim=16,
            qk_dims=[32, 64, 96, 128],
            topks=[3, 3, 5, -2],
            kv_downsample_mode="maxpool",
            kv_downsample_ratios=[2, 2, 1, 1],
            auto_pad=True,
            mlp_ratios=[3, 3, 3, 3],
            num_classes=10,
        ),
    ),
    "opts_d": (
        "biformer",
        dict(
            _OPTS,
            head_dim=32,
            topks=[1, 2, 4, -1],
            kv_downsample_mode="ada_maxpool",
            kv_per_wins=[1, 2, 2, -1],
            side_dwconv=3,
            before_attn_dwconv=0,
            mlp_ratios=[4, 4, 4, 4],
        ),
    ),
    "debiformer_tiny": ("debiformer_tiny", {}),
    "debiformer_small": ("debiformer_small", {}),
    "debiformer_base": ("debiformer_base", {}),
    "debiformer_tiny_train": ("debiformer_tiny", {}),
    # Segmentation cases (golden/README.md "Segmentation cases"): the official configs' models.
    "sfpn_biformer_small": ("sfpn_biformer_small", {}),
    "upernet_biformer_small": ("upernet_biformer_small", {}),
    "sfpn_debiformer_small": ("sfpn_debiformer_small", {}),
    # Detection cases (golden/README.md "Detection cases"): the official COCO configs' models.
    "retinanet_biformer_small": ("retinanet_biformer_small", {}),
    "maskrcnn_biformer_small": ("maskrcnn_biformer_small", {}),
}


def recipe_value(name: str, shape, dtype: str, salt: str = "") -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32((salt + name).encode()))
    shape = tuple(shape)
    if name.endswith("num_batches_tracked"):
        return np.zeros(shape, np.int64)
    if name.endswith("running_var"):
        v = 0.5 + rng.random(shape)
    elif name.endswith("running_mean"):
        v = 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1 and name.endswith(("weight", "gamma1", "gamma2")):
        v = 1 + 0.1 * rng.standard_normal(shape)
    elif len(shape) == 1:
        v = 0.1 * rng.standard_normal(shape)
    else:
        v = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    return v.astype(np.float32)


class GoldenCase:
    def __init__(self, case: str):
        self.case = case
        self.manifest = json.loads((GOLDEN_DIR / f"{case}.manifest.json").read_text())
        self.data = np.load(GOLDEN_DIR / f"{case}.npz")
        self.salt = self.manifest.get("salt", "")
        self.model_name, self.kwargs = CASES[case]

    @property
    def train(self) -> bool:
        return self.manifest["mode"] == "train"

    def state_dict(self) -> dict[str, np.ndarray]:
        return {n: recipe_value(n, s, d, self.salt) for n, s, d in self.manifest["state_dict"]}

    def input_nhwc(self) -> np.ndarray:
        x = self.data["input_nchw"]
        rebuilt = (
            np.random.default_rng(zlib.crc32((self.salt + "input").encode()))
            .standard_normal(self.manifest["input_shape_nchw"])
            .astype(np.float32)
        )
        np.testing.assert_array_equal(rebuilt, x)  # the recipe is what made the data
        return x.transpose(0, 2, 3, 1)

    def routes(self) -> list[np.ndarray]:
        keys = sorted(k for k in self.data.files if k.startswith("route/"))
        return [self.data[k] for k in keys]


def require(case: str) -> GoldenCase:
    """The case's data; a missing file skips the test, or fails it under BIFORMER_REQUIRE_GOLDEN=1 (CI)."""
    for name in (f"{case}.npz", f"{case}.manifest.json"):
        if not (GOLDEN_DIR / name).exists():
            required.missing(
                f"golden file {name} not found under {GOLDEN_DIR} (put shared/golden beside the repository "
                "or set BIFORMER_GOLDEN_DIR)",
                required.GOLDEN_ENV,
            )
    return GoldenCase(case)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def route_agreement(ours: list[np.ndarray], theirs: list[np.ndarray]) -> tuple[int, int]:
    """(rows whose region sets agree, all rows) over every routing module."""
    assert len(ours) == len(theirs), f"{len(ours)} routing modules vs {len(theirs)} in the golden data"
    same = total = 0
    for a, b in zip(ours, theirs):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"route shape {a.shape} vs golden {b.shape}"
        sa, sb = np.sort(a, axis=-1), np.sort(b.astype(a.dtype), axis=-1)
        rows = np.all(sa == sb, axis=-1)
        same += int(rows.sum())
        total += rows.size
    return same, total


def train_case(case: str, scan_blocks: bool = False) -> tuple[float, dict[str, float], list[int]]:
    """Runs a train case through the calling convention of golden/README.md.

    One train-mode forward (BatchNorm on batch statistics) and the gradient of
    sum(logits * cotangent). Returns (logits relative L2 error, {"<grad key>" or
    "after/<running stat>": relative L2 error}, every BatchNorm's num_batches_tracked).
    `scan_blocks`: each stage's blocks as one lax.scan (the scanned training step).
    """
    import jax
    import jax.numpy as jnp

    from biformer_jax import convert, models

    g = require(case)
    model = models.create_model(g.model_name, **g.kwargs, scan_blocks=scan_blocks)
    variables = convert.from_torch_state_dict(g.state_dict(), model)
    x, cotangent = jnp.asarray(g.input_nhwc()), jnp.asarray(g.data["cotangent"])
    key = jax.random.key(0)

    @jax.jit
    def grads_and_stats(params, batch_stats):
        def loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key, "drop_path": key},
            )
            return jnp.sum(logits * cotangent), (logits, updates)

        (_, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads, updates

    logits, grads, updates = grads_and_stats(variables["params"], variables["batch_stats"])
    named = convert.to_torch_state_dict({"params": grads, **updates})
    errors = {k: rel_l2(named[k], g.data[f"grad/{k}"]) for k in g.manifest["grad_keys"]}
    for name in g.data.files:
        if name.startswith("after/"):
            errors[name] = rel_l2(named[name[len("after/") :]], g.data[name])
    counts = [int(v) for k, v in named.items() if k.endswith("num_batches_tracked")]
    assert np.isfinite(np.asarray(logits)).all()
    return rel_l2(logits, g.data["logits"]), errors, counts


def beyond_train_bar(errors: dict[str, float]) -> dict[str, float]:
    """golden/README.md's bar for train cases: gradients within 1e-3, running statistics within 1e-2."""
    return {k: v for k, v in errors.items() if v > (1e-2 if k.startswith("after/") else 1e-3)}


def eval_case(case: str, scan_blocks: bool = False) -> tuple[float, int, int]:
    """Runs an eval case through the calling convention of golden/README.md.

    Returns (logits relative L2 error, routed rows with the official region set, all rows).
    `scan_blocks`: the logits come from a pass without recorded intermediates, whose blocks
    run as one lax.scan per stage (the routes are still recorded unrolled).
    """
    import jax
    import jax.numpy as jnp

    from biformer_jax import convert, models

    g = require(case)
    model = models.create_model(g.model_name, **g.kwargs, scan_blocks=scan_blocks)
    variables = convert.from_torch_state_dict(g.state_dict(), model)

    @jax.jit
    def forward(variables, x):
        logits, inter = model.apply(variables, x, train=False, mutable=["intermediates"])
        return logits, models.collect_routes(inter)

    logits, routes = forward(variables, jnp.asarray(g.input_nhwc()))
    if scan_blocks:
        logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(g.input_nhwc()))
    same, total = route_agreement(routes, g.routes())
    return rel_l2(logits, g.data["logits"]), same, total
