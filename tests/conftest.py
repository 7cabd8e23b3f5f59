"""Test setup: 8 fake CPU devices, so sharding is exercised on one machine.

XLA_FLAGS must be set before jax is imported anywhere, hence here. The
tests' models are tiny, so XLA's compile time dominates their run time:
backend optimisation level 0 cuts it about five-fold (same math), and a
persistent compilation cache serves repeated compiles.
"""

import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The training-loop tests build the same programs many times (in this process
# and in launch/train.py subprocesses, which inherit these): JAX's persistent
# compilation cache turns every compile after the first into a read.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; pytest does not parse them.
flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("CI") == "true":
        skip = pytest.mark.skip(reason="slow test: skipped in CI")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> str:
    """A data.cache_dir holding the demo data, generated once per session."""
    from veclip_jax.data.demo import ensure_demo_data

    cache = str(tmp_path_factory.mktemp("demo_cache"))
    ensure_demo_data(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_run(demo_cache, tmp_path_factory):
    """(workdir, TrainResult) of one finished tiny run (8 fake devices), keeping only its last checkpoint."""
    from tests.helpers import tiny_run_config
    from veclip_jax.train import loop

    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    return workdir, loop.train(tiny_run_config(demo_cache, keep_checkpoints=1), workdir)
