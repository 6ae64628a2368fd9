"""Shared pieces of the trainer tests: a micro config on digits and a session compilation cache.

Every trainer test trains the same micro BiFormer at 32x32 with the same batch shapes, so after
the first test XLA's persistent compilation cache (a fresh directory per session) turns the
remaining compiles into cache reads.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from biformer_jax.models import from_config
from configs import biformer_s, common, quickstart

ROOT = Path(__file__).resolve().parents[2]

_CACHE_DIR: str | None = None


def enable_compilation_cache() -> str:
    """The session's persistent cache directory: the run's (JAX_COMPILATION_CACHE_DIR, which jax
    read at import), else a fresh one for this process."""
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tempfile.mkdtemp(prefix="biformer-test-xla-cache-")
        jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return _CACHE_DIR


def random_variables(model, seed: int = 0, *, image_size=32, scale: float = 0.1) -> dict:
    """Weights of the model's shapes (at `image_size`, H or (H, W)) filled with numpy noise, normal
    with std `scale` (running variances uniform in [0.5, 1.5]): a "pretrained" checkpoint without
    a compile (one eager jax.random call per array would compile a program for each)."""
    rng = np.random.default_rng(seed)
    abstract = from_config.abstract_variables(model, image_size)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name:  # BatchNorm running variances must be positive
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        if not np.issubdtype(s.dtype, np.floating):  # num_batches_tracked
            return np.zeros(s.shape, s.dtype)
        return (scale * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


# The tests' micro runs on the digits: configs/common.py's small run (RUNLOCAL) with these
# fields changed, for the in-process trainer tests and the train.py subprocesses alike.
MICRO = {
    "global_batch_size": 16,  # 2 per simulated CPU device
    "optim.warmup_epochs": 0.0,
    "eval_batch_size": 40,
    "eval_steps": 1,
    "checkpoint.every_steps": 2,
}


def imagenet_micro_config(data_dir, **overrides):
    """BiFormer-S's ImageNet recipe (RandAugment, erasing, repeats, mixup/cutmix, EMA), micro model, 32 px."""
    config = biformer_s.get_config()
    config.model_kwargs.depth = (1, 1, 1, 1)  # a new create_model argument: not an override of a field
    return common.apply_runlocal(
        config,
        **{
            "model": "biformer_micro",
            "data.data_dir": str(data_dir),
            "data.image_size": 32,
            "data.eval_resize": 36,
            "data.threads": 2,
            "data.prefetch": 2,
            "data.repeated_aug": 3,
            "global_batch_size": 24,  # 3 per simulated CPU device; 8 images x 3 repeats
            "num_train_steps": 6,
            "steps_per_epoch": 2,
            "optim.warmup_epochs": 1.0,
            "eval_every_steps": 4,
            "checkpoint.every_steps": 2,
            "eval_steps": -1,
            "ema_decay": 0.9,
            **overrides,
        },
    ).lock()


def micro_config(**overrides):
    """The quickstart, shrunk: a 1-block-per-stage micro BiFormer, 4 steps of 16 digits, EMA on."""
    config = quickstart.get_config()
    config.model_kwargs.depth = (1, 1, 1, 1)  # a new create_model argument: not an override of a field
    return common.apply_runlocal(
        config,
        **{
            **MICRO,
            "num_train_steps": 4,
            "steps_per_epoch": 2,
            "eval_every_steps": 2,
            "checkpoint.keep": 2,
            "ema_decay": 0.9,  # exercise the EMA path
            **overrides,
        },
    ).lock()


# Parameter entries of the tests' micro BiFormer (depth 1 per stage, 32 px: stage maps 8, 4, 2
# and 1 px) whose gradient is analytically zero, as {keystr path: boolean mask, or None for the
# whole array}. At AdamW's production eps (1e-8) the float32 rounding noise in such a gradient
# becomes +-lr steps that differ with the reduction order (another mesh, another process count),
# so parameter comparisons leave exactly these entries out. Why each is zero:
# - conv biases right before a BatchNorm (stem convs 0 and 3, each downsampling conv 0): the
#   BatchNorm subtracts the batch mean per channel;
# - what adds a per-channel constant to the residual stream of the last block of stage 3 (the
#   final BatchNorm follows) or of stage 2 (its 2x2 map becomes 1x1 through a 3x3/2 conv whose
#   taps all fall inside, so a constant stays a constant before downsample_layers_3's BatchNorm):
#   the MLP's output bias, the attention's output-projection bias, the LePE bias (it goes
#   through that projection only) and, in stage 2, the V part of the qkv bias (attention rows
#   sum to 1);
# - on stage 3's 1x1 map: the q and k columns of the qkv kernel (attention over one token is
#   softmax = 1) and every conv tap but the centre (the others only see padding); on stage 2's
#   2x2 map the LePE taps two pixels off centre.
PRE_BATCHNORM_BIASES = frozenset(
    ["['downsample_layers_0']['0']['bias']", "['downsample_layers_0']['3']['bias']"]
    + [f"['downsample_layers_{i}']['0']['bias']" for i in (1, 2, 3)]
)


def _all_but_centre(k: int, channels: int) -> np.ndarray:
    mask = np.ones((k, k, 1, channels), bool)
    mask[k // 2, k // 2] = False
    return mask


def _ring(k: int, width: int, channels: int) -> np.ndarray:
    mask = np.ones((k, k, 1, channels), bool)
    mask[width : k - width, width : k - width] = False
    return mask


ANALYTICALLY_ZERO_GRADIENT = {
    **{name: None for name in PRE_BATCHNORM_BIASES},
    **{f"['stages_{i}_0']['{leaf}']['bias']": None for i in (2, 3) for leaf in ("mlp']['3", "attn']['lepe")},
    "['stages_2_0']['attn']['wo']['bias']": None,
    "['stages_3_0']['attn']['proj']['bias']": None,
    "['stages_2_0']['attn']['qkv']['qkv']['bias']": np.arange(192) >= 128,  # (q 64, k 64, v 64)
    "['stages_2_0']['attn']['lepe']['kernel']": _ring(5, 1, 64),
    "['stages_3_0']['attn']['qkv']['kernel']": np.broadcast_to(np.arange(384) < 256, (128, 384)),  # q, k, v
    "['stages_3_0']['attn']['lepe']['kernel']": _all_but_centre(5, 128),
    "['stages_3_0']['pos_embed']['kernel']": _all_but_centre(3, 128),
}


def param_differences(got, want) -> dict[str, float]:
    """{keystr path: max |got - want|} over every leaf of two micro-BiFormer parameter trees, leaving
    out the ANALYTICALLY_ZERO_GRADIENT entries (a leaf made only of them is not listed)."""
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    out = {}
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        key = jax.tree_util.keystr(path)
        diff = np.abs(np.asarray(g, np.float64) - np.asarray(flat_want[path], np.float64))
        if key in ANALYTICALLY_ZERO_GRADIENT:
            mask = ANALYTICALLY_ZERO_GRADIENT[key]
            if mask is None:
                continue
            diff = diff[~mask]
        out[key] = float(np.max(diff))
    return out


def zero_gradient_drift(got, want) -> float:
    """max |got - want| over the ANALYTICALLY_ZERO_GRADIENT entries (what the comparisons leave out)."""
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    drift = 0.0
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        key = jax.tree_util.keystr(path)
        if key in ANALYTICALLY_ZERO_GRADIENT:
            mask = ANALYTICALLY_ZERO_GRADIENT[key]
            diff = np.abs(np.asarray(g, np.float64) - np.asarray(flat_want[path], np.float64))
            drift = max(drift, float(np.max(diff if mask is None else diff[mask])))
    return drift
