"""Test setup, before jax is imported anywhere: 8 fake CPU devices, and LLVM optimisation level 0.

The suite is compile-bound (tiny shapes, many distinct programs): level 0 compiles 1.5-3x faster while the
tiny programs run slower by a few milliseconds. Numerics are unchanged (no fast-math either way).
"""

import os
import sys

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# libtpu (test extras) compiles for TPU topology descriptions in some tests: no metadata server to ask, and no
# machine-wide lock, so every xdist worker and subprocess may load it.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

# Test-only assets that `launch/setup.sh test` fetches from PyPI at install time (never at test time).
os.environ.setdefault("DREAMVIDEO_TEST_ASSETS", os.path.join(sys.prefix, "test-assets"))

# Under pytest-xdist (`launch/test.sh` runs `--dist loadfile`), a file runs whole on one worker and workers take
# files in collection order: start the longest files first so no worker is left alone with one at the end.
LONGEST_FIRST = ("test_train_cli.py", "test_demo.py", "test_train.py", "test_benchmark.py", "test_remat.py",
                 "test_readme.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="module")
def fast_compile():
    """XLA's high-level optimisations off for a module of tiny-shape tests: at these sizes they cost more compile
    time than they save at run time. Use with `pytestmark = pytest.mark.usefixtures("fast_compile")`."""
    import jax

    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
