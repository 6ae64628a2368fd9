"""Test setup: 8 simulated CPU devices at XLA -O0 (support/xla_flags.py; set before jax is imported
anywhere), and the shared fixtures.

The checkout, tests/ (for the `support` helpers) and benchmarks/ come first on sys.path through
pytest's `pythonpath` setting (pyproject.toml), also when the venv holds an editable install of
another checkout.
"""

import gc
import os
import sys

import pytest
from support.xla_flags import xla_flags_for

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags_for(8)).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Python's cyclic garbage collector, less often. Tracing a model allocates millions of
# short-lived objects, and at the default thresholds (700, 10, 10) a worker ran a full collection
# over its ~0.5-2 million live objects (jax's caches, the imported packages) dozens of times per
# file: test_configs.py spent 19.6 of its 86.5 s of CPU in the collector (gc.callbacks), 3.3 s at
# these thresholds (73.2 s in all); test_models.py 9.1 -> 1.3 s (134.4 -> 130.1 s), the same peak
# RSS (2.2 / 2.1 GB). Only the test processes: the CLIs they start keep Python's defaults.
gc.set_threshold(50_000, 20, 20)
COLLECT_AFTER_GROWTH = 1 << 30  # bytes of resident memory a worker may gain before a full collection
_collected_at = [0]


@pytest.fixture(autouse=True, scope="module")
def _collect_when_memory_grew():
    """After a test file, a full collection if the worker's RSS grew by COLLECT_AFTER_GROWTH
    since the last one: what jax.clear_caches() drops in reference cycles waits for a full
    collection, which now comes rarely. (A full collection after every file cost the suite ~90 s
    of CPU: ~1.5 s each over ~1.9 million objects late in a worker.)"""
    yield
    if sys.platform != "linux":
        return
    from biformer_jax.host_memory import resident_bytes  # imports jax: not before XLA_FLAGS above

    if resident_bytes() > _collected_at[0] + COLLECT_AFTER_GROWTH:
        gc.collect()
        _collected_at[0] = resident_bytes()


@pytest.fixture(scope="session")
def compilation_cache() -> str:
    """XLA's persistent compilation cache in a fresh directory for the session (its path).

    The trainer tests train the same micro BiFormer with the same batch shapes, so after the
    first test their compiles become cache reads; their modules use it with
    `pytestmark = pytest.mark.usefixtures("compilation_cache")`. Under scripts/test.sh every
    process of the run already shares one (JAX_COMPILATION_CACHE_DIR), and this is that one.
    """
    from support import train_testlib

    return train_testlib.enable_compilation_cache()


@pytest.fixture(scope="session")
def mini_imagenet(tmp_path_factory):
    """The real TFDS imagenet2012 (array_record) built from 3 classes x 8 train JPEGs + 3 val JPEGs."""
    from support import imagenet_fixture

    return imagenet_fixture.build_mini_imagenet(tmp_path_factory.mktemp("imagenet"), per_class=8)


@pytest.fixture
def micro_config():
    """`micro_config(**overrides)`: the quickstart's micro run (train_testlib.micro_config)."""
    from support import train_testlib

    return train_testlib.micro_config


@pytest.fixture
def imagenet_micro_config(mini_imagenet):
    """`imagenet_micro_config(**overrides)`: BiFormer-S's ImageNet recipe, micro model, on mini_imagenet."""
    from support import train_testlib

    return lambda **overrides: train_testlib.imagenet_micro_config(mini_imagenet, **overrides)
