"""Device meshes with the axes ('data', 'fsdp', 'tensor') and the logical-axis rules that map onto them.

Axis sizes come from the config's `mesh` section; one of them may be -1 ("all remaining devices"). Every axis is
`AxisType.Auto`: linen's `nn.with_logical_constraint` asserts on Explicit axes, which `jax.make_mesh` now uses by
default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from dreamvideo_jax.parallel import axes as ax

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
# Mesh axes the global batch is split over (data parallelism and FSDP both see distinct examples).
BATCH_AXES = (DATA, FSDP)


def mesh_defaults() -> ml_collections.ConfigDict:
    """The `mesh` config section: axis sizes; -1 = the devices left over (at most one axis)."""
    return ml_collections.ConfigDict({DATA: -1, FSDP: 1, TENSOR: 1})


def sharding_defaults() -> ml_collections.ConfigDict:
    """The `sharding` config section.

    `rules`: (logical axis, mesh axis | tuple of mesh axes | None) pairs, first match wins (flax semantics).
    A mesh axis that does not divide a dimension is dropped for that dimension (the dimension is replicated), so
    3-channel convs and small biases never fail to shard.
    `fsdp_min_size`: parameters with at least this many elements that the rules leave unsharded over 'fsdp'
    get their largest divisible dimension sharded over 'fsdp' (a safety net for badly annotated leaves).
    """
    return ml_collections.ConfigDict(dict(
        rules=(
            (ax.EMBED, FSDP),
            (ax.CONV_IN, FSDP),
            (ax.VOCAB, FSDP),
            (ax.MLP, TENSOR),
            (ax.HEADS, TENSOR),
            (ax.CONV_OUT, TENSOR),
            (ax.KERNEL_SPACE, None),
            (ax.NORM, None),
            (ax.POSITION, None),
            (ax.ACT_BATCH, BATCH_AXES),
            (ax.ACT_LENGTH, None),
            (ax.ACT_EMBED, TENSOR),
            (ax.ACT_HEIGHT, None),
            (ax.ACT_WIDTH, None),
        ),
        fsdp_min_size=2**14,
    ))


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Axis sizes in MESH_AXES order with -1 resolved; raises a readable error when they cannot fit."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axes {unknown}; the axes are {MESH_AXES}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                             f"{dict(zip(MESH_AXES, shape))} (product {fixed})")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh: axes {dict(zip(MESH_AXES, shape))} need {math.prod(shape)} devices, "
                         f"but {num_devices} are available")
    return tuple(shape)


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(mesh_config.items()) if hasattr(mesh_config, "items") else dict(mesh_config)
    shape = resolve_axis_sizes(sizes, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    # A sub-mesh (tests, single-device debugging) or the devices of a topology description (ahead-of-time
    # compilation): plain row-major layout of the given devices.
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_from_config(sharding_config: Any) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules as a tuple of (name, mesh axes) pairs with lists turned into tuples."""
    rules = []
    for item in sharding_config.rules:
        if len(item) != 2:
            raise ValueError(f"sharding.rules: each rule is (logical_name, mesh_axes), got {item!r}")
        name, target = item
        if isinstance(target, list):
            target = tuple(target)
        for t in (target if isinstance(target, tuple) else (target,)):
            if t is not None and t not in MESH_AXES:
                raise ValueError(f"sharding.rules: rule {name!r} maps to unknown mesh axis {t!r}; axes: {MESH_AXES}")
        rules.append((str(name), target))
    return tuple(rules)




def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The axes of any mesh a batch is split over: its data-parallel axes, or all of its axes if it has none."""
    axes = tuple(a for a in mesh.axis_names if a in BATCH_AXES + ("batch",))
    return axes or tuple(mesh.axis_names)


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
    """How many ways `batch_axes` split a batch."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def fewest_devices_mesh(batch: int, devices: Sequence[jax.Device]) -> tuple[jax.sharding.Mesh, int]:
    """A ('data',) mesh over the fewest of `devices` that need as few rounds as all of them, and the batch padded
    to a multiple of its size: ``k = ceil(B / ceil(B / n))`` devices (1 sample on 8 devices runs on one device
    instead of computing 7 discarded copies)."""
    rounds = -(-batch // len(devices))
    k = -(-batch // rounds)
    return jax.sharding.Mesh(np.asarray(devices[:k]), (DATA,)), rounds * k
