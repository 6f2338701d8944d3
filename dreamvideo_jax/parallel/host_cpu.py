"""CPU host setup before JAX starts: one XLA device per core, and freed memory kept for the next step.

**One XLA device per core**, for data-parallel training and sampling on a CPU-only machine.

XLA:CPU runs each convolution on one thread (its YNNPACK kernels are single-threaded; only large matmuls and
elementwise loops are split across the intra-op pool), and a U-Net step is mostly a chain of dependent ops, so
on one device the second core idles most of the step (a traced bench train step: both cores busy 28% of the
time). Exposing the host as one device per core (``--xla_force_host_platform_device_count``) and splitting the
batch over them (the trainer's ``data`` axis, the sampler's batch sharding) runs the shards side by side.
Measured on 2 cores (WORKSPACE.md, Demo): the demo's stage-1 step 0.30 -> 0.25 s, stage 2 0.40 -> 0.34 s.

**Freed memory kept** (:func:`retain_freed_memory`). XLA:CPU takes each step's temporaries (4.4 GiB for the bench
train step) from glibc's malloc, which serves large blocks with fresh ``mmap`` pages and unmaps them on free, so
every step faults its whole working set in again, zero-filled by the kernel: 1.28 M page faults and ~4.8 s of
system time per 7-9 s bench train step. Keeping freed memory in the process (one arena, no ``mmap`` blocks, no
trimming; what a caching allocator does on an accelerator) takes that to 0 faults and ~0.1 s. The price is the
one arena: XLA's multi-threaded compiles contend for it and take 20-35 s longer at that size, and at the demo's
size the steps do not get measurably faster, so only ``python -m benchmarks
--retain_freed_memory`` uses it (WORKSPACE.md, Benchmarks).

Both only work before JAX starts (XLA reads ``XLA_FLAGS`` once; malloc threads pick their arena on first use),
so entry points call them first thing in ``main``; an explicit device count in ``XLA_FLAGS`` is left alone.
Nothing here imports JAX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

_FLAG = "--xla_force_host_platform_device_count"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def devices_for(cores: int | None = None, limit: int = 8) -> int:
    """The largest power of two that is at most the usable cores and ``limit`` (powers of two split the usual
    batch sizes evenly)."""
    if limit < 1:
        raise ValueError(f"limit={limit} must be >= 1")
    n = max(1, min(usable_cores() if cores is None else cores, limit))
    return 1 << (n.bit_length() - 1)


def use_one_device_per_core(devices: int = 0) -> int:
    """Sets ``XLA_FLAGS`` so the host CPU shows up as ``devices`` XLA devices (0 = :func:`devices_for`); returns
    the count in effect.

    A count already in ``XLA_FLAGS`` wins (it is returned unchanged). Raises if JAX has already been imported,
    since the flag would then silently do nothing.
    """
    if devices < 0:
        raise ValueError(f"devices={devices} must be >= 0 (0 = one per core)")
    flags = os.environ.get("XLA_FLAGS", "")
    for part in flags.split():
        if part.startswith(_FLAG + "="):
            return int(part.split("=", 1)[1])
    if "jax" in sys.modules:
        raise RuntimeError("use_one_device_per_core must run before jax is imported (XLA reads XLA_FLAGS once)")
    n = devices or devices_for()
    if n > 1:
        os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
    return n


# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_retained = False


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the kernel; returns whether
    it applies (glibc only; elsewhere nothing changes).

    One arena (``M_ARENA_MAX=1``: other arenas fall back to ``mmap`` for blocks over 64 MiB whatever the
    limits), no ``mmap``-served blocks (``M_MMAP_MAX=0``) and no trimming (``M_TRIM_THRESHOLD=-1``). The
    resident size then stays at its peak instead of shrinking between steps. Call it before JAX (or any
    threaded library) starts: a thread keeps the arena it first allocated from.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)):
        if _libc().mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) failed")
    global _retained
    _retained = True
    return True


def freed_memory_retained() -> bool:
    """Whether :func:`retain_freed_memory` has been applied in this process."""
    return _retained


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def retained_free_bytes() -> int:
    """Bytes that malloc holds free for reuse after :func:`retain_freed_memory` (0 before it, or without glibc's
    ``mallinfo2``): the OS counts them as used, but this process's next allocations get them first."""
    if not _retained:
        return 0
    libc = _libc()
    if not hasattr(libc, "mallinfo2"):
        return 0
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().fordblks)
