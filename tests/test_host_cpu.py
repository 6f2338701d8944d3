"""One XLA device per CPU core (parallel/host_cpu.py): the count chosen, the caller's XLA_FLAGS respected, and
the flag taking effect in a fresh process (it cannot in this one: JAX is already initialised here)."""

import os
import subprocess
import sys

import pytest

from dreamvideo_jax.parallel import host_cpu


@pytest.mark.parametrize("cores, limit, expected", [(1, 8, 1), (2, 8, 2), (3, 8, 2), (6, 8, 4), (12, 8, 8),
                                                     (64, 8, 8), (6, 2, 2), (0, 8, 1)])
def test_devices_are_a_power_of_two_within_cores_and_limit(cores, limit, expected):
    assert host_cpu.devices_for(cores, limit) == expected


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="limit=0"):
        host_cpu.devices_for(4, 0)
    with pytest.raises(ValueError, match="devices=-1"):
        host_cpu.use_one_device_per_core(-1)


def test_a_count_already_in_xla_flags_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3")
    assert host_cpu.use_one_device_per_core(2) == 3
    assert os.environ["XLA_FLAGS"].count("device_count") == 1


def test_refuses_once_jax_is_imported(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    import jax  # noqa: F401  (already imported by the suite; made explicit)

    with pytest.raises(RuntimeError, match="before jax is imported"):
        host_cpu.use_one_device_per_core(2)


def test_sets_the_device_count_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("from dreamvideo_jax.parallel import host_cpu\n"
            "n = host_cpu.use_one_device_per_core(2)\n"
            "import jax\n"
            "print(n, jax.device_count(), jax.default_backend())\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    n, count, backend = out.stdout.split()
    assert backend == "cpu" and int(n) == 2 and int(count) == 2
