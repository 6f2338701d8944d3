"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Test-only assets that `launch/setup.sh test` fetches from PyPI at install time (never at test time).
os.environ.setdefault("DREAMVIDEO_TEST_ASSETS", os.path.join(sys.prefix, "test-assets"))
