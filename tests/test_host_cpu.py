"""CPU host setup (parallel/host_cpu.py). One XLA device per core: the count chosen, the caller's XLA_FLAGS
respected, and the flag taking effect in a fresh process (it cannot in this one: JAX is already initialised
here). Freed memory retained: a freed large block is reused without faulting its pages in again."""

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


# A fresh process mallocs, fills and frees a 256 MiB block (as XLA:CPU does with a step's temporaries), then
# counts the page faults of doing it again.
_REFILL = r"""
import ctypes, ctypes.util, resource, sys
from dreamvideo_jax.parallel import host_cpu
retained = sys.argv[1] == "1" and host_cpu.retain_freed_memory()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 2**28
def fill():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p
libc.free(fill())
free = host_cpu.retained_free_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(retained, free, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux" or os.confstr("CS_GNU_LIBC_VERSION").split()[0] != "glibc",
                    reason="glibc's malloc only")
def test_retained_memory_is_reused_without_page_faults():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    pages = (2**28) // os.sysconf("SC_PAGE_SIZE")
    runs = {}
    for retain in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", _REFILL, retain], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout.split()
        runs[retain] = (out[0] == "True", int(out[1]), int(out[2]))
    assert runs["0"][:2] == (False, 0) and runs["0"][2] > pages // 2  # unmapped on free, faulted in again
    retained, free, faults = runs["1"]
    assert retained and free >= 2**28
    assert faults < pages // 100, faults
