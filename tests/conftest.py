"""Test setup: 8 simulated CPU devices at XLA -O0 (support/xla_flags.py; set before jax is imported
anywhere), and the shared fixtures.

The checkout, tests/ (for the `support` helpers) and benchmarks/ come first on sys.path through
pytest's `pythonpath` setting (pyproject.toml), also when the venv holds an editable install of
another checkout.
"""

import gc
import json
import os
import sys
from pathlib import Path

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


def pytest_addoption(parser):
    parser.addoption(
        "--file-seconds-out",
        default=None,
        help="write each test file's seconds (setup + call + teardown of its tests) as JSON to this "
        "path at the end of the run: the table FILE_SECONDS orders the files by "
        "(scripts/test.sh --file-seconds-out=tests/file_seconds.json refreshes it)",
    )


FILE_SECONDS = Path(__file__).with_name("file_seconds.json")


def pytest_collection_modifyitems(config, items):
    """The test files heaviest first, by their seconds in the last measured run (FILE_SECONDS).

    scripts/test.sh hands whole files to its two workers in collection order (`--dist loadfile
    --no-loadscope-reorder`): the longest first leaves only short files for the end, so the two
    workers finish together (longest-processing-time-first). xdist's own order (most tests
    first) left the long single-test files (two-process training, the gs:// workdir, the Mask
    R-CNN task) for last: simulated from the 2026-12-07 run's durations, one worker finished
    ~170 s before the other. A file missing from the table counts as the heaviest (it starts
    early); the order within a file is kept.
    """
    seconds = json.loads(FILE_SECONDS.read_text()) if FILE_SECONDS.exists() else {}
    heaviest = max(seconds.values(), default=0.0) + 1.0

    def weight(item) -> float:
        return -seconds.get(_file_of(item), heaviest)

    items.sort(key=weight)  # stable: each file's tests stay together and in order


def _file_of(item) -> str:
    return item.nodeid.split("::", 1)[0]


_file_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    # Under xdist the controller receives every worker's reports: the table covers the whole run.
    name = _file_of(report)
    _file_seconds[name] = _file_seconds.get(name, 0.0) + report.duration


def pytest_sessionfinish(session):
    path = session.config.getoption("--file-seconds-out")
    if path and not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        table = {name: round(s, 1) for name, s in sorted(_file_seconds.items(), key=lambda e: -e[1])}
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        tmp.replace(path)  # whole or not at all


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
