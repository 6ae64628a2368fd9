"""Shared pieces of the trainer tests: a micro config on digits and a session compilation cache.

Every trainer test trains the same micro BiFormer at 32x32 with the same batch shapes, so after
the first test XLA's persistent compilation cache (a fresh directory per session) turns the
remaining compiles into cache reads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import numpy as np

from biformer_jax.models import from_config
from configs import biformer_s, common, quickstart

ROOT = Path(__file__).resolve().parents[2]

_CACHE_DIR: str | None = None


def enable_compilation_cache() -> str:
    global _CACHE_DIR
    if _CACHE_DIR is None:
        _CACHE_DIR = tempfile.mkdtemp(prefix="biformer-jax-test-xla-cache-")
        jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return _CACHE_DIR


def random_variables(model, seed: int = 0) -> dict:
    """Weights of the model's shapes filled with numpy noise: a "pretrained" checkpoint without a compile."""
    rng = np.random.default_rng(seed)
    abstract = from_config.abstract_variables(model, 32)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "var" in name:  # BatchNorm running variances must be positive
            return rng.uniform(0.5, 1.5, s.shape).astype(s.dtype)
        if not np.issubdtype(s.dtype, np.floating):  # num_batches_tracked
            return np.zeros(s.shape, s.dtype)
        return (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

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
