"""One XLA device per CPU core, for data-parallel training and sampling on a CPU-only machine.

XLA:CPU runs each convolution on one thread (its YNNPACK kernels are single-threaded; only large matmuls and
elementwise loops are split across the intra-op pool), and a U-Net step is mostly a chain of dependent ops, so
on one device the second core idles most of the step (a traced bench train step: both cores busy 28% of the
time). Exposing the host as one device per core (``--xla_force_host_platform_device_count``) and splitting the
batch over them (the trainer's ``data`` axis, the sampler's batch sharding) runs the shards side by side.
Measured on 2 cores (WORKSPACE.md, Demo): the demo's stage-1 step 0.30 -> 0.25 s, stage 2 0.40 -> 0.34 s.

This only works before JAX initialises its backends, so entry points call :func:`use_one_device_per_core`
first thing in ``main``; it leaves an explicit device count in ``XLA_FLAGS`` alone. Nothing here imports JAX.
"""

from __future__ import annotations

import os
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
