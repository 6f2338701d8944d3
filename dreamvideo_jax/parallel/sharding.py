"""Shardings of parameter trees from their logical axis names, and global batches from per-process data.

`logical_to_spec` differs from flax's `nn.logical_to_mesh_sharding` in two ways that matter for real models:
a mesh axis that does not divide a dimension is dropped (replicating that dimension) instead of failing at
`device_put`, and a large leaf left unsharded over 'fsdp' gets its largest divisible dimension sharded
(so a forgotten annotation costs a little speed, not the memory of a replicated 1 GB tensor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dreamvideo_jax.parallel.mesh import BATCH_AXES, FSDP


def is_boxed(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def unbox(tree):
    """Strips flax's logical-partitioning boxes (arrays or ShapeDtypeStructs) without applying constraints.

    (`nn.meta.unbox` applies each parameter's logical constraint when a mesh is set, which flax refuses for
    names repeated within one array, e.g. the spatial axes of a conv kernel.)
    """
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_boxed(x) else x, tree, is_leaf=is_boxed)


def _lookup(name: str | None, rules: Sequence[tuple[str, Any]]):
    if name is None:
        return None
    for logical, target in rules:
        if logical == name:
            return target
    return None


def logical_to_spec(
    names: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Any]],
    fsdp_min_size: int = 0,
) -> P:
    """PartitionSpec for one array; mesh axes that do not divide their dimension are dropped."""
    shape = tuple(shape)
    names = tuple(names) if names is not None else (None,) * len(shape)
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match shape {shape}")
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(names, shape):
        target = _lookup(name, rules)
        axes = target if isinstance(target, tuple) else (target,) if target else ()
        kept = []
        size = 1
        for a in axes:
            n = mesh.shape[a]
            if a in used or n == 1 or dim % (size * n):
                continue
            kept.append(a)
            size *= n
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else kept[0] if kept else None)
    n_fsdp = mesh.shape.get(FSDP, 1)
    if fsdp_min_size and FSDP not in used and n_fsdp > 1 and math.prod(shape) >= fsdp_min_size:
        order = sorted(range(len(shape)), key=lambda i: -shape[i])
        for i in order:
            if spec[i] is None and shape[i] % n_fsdp == 0:
                spec[i] = FSDP
                break
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_shardings(
    boxed_tree: Any,
    mesh: jax.sharding.Mesh,
    rules: Sequence[tuple[str, Any]],
    fsdp_min_size: int = 0,
) -> Any:
    """NamedShardings for a (possibly abstract) tree of logically boxed leaves; the result is unboxed.

    Unboxed leaves (no logical names) are replicated unless the fsdp safety net applies.
    """

    def one(x):
        if is_boxed(x):
            value = x.unbox()
            names = getattr(x, "names", None)
        else:
            value, names = x, None
        return NamedSharding(mesh, logical_to_spec(names, np.shape(value), mesh, rules, fsdp_min_size))

    return jax.tree.map(one, boxed_tree, is_leaf=is_boxed)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
    del ndim
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Per-process numpy batches -> global jax arrays sharded over the batch axes.

    Each process passes its own slice (global batch / process count examples); the global array is their
    concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
    """Numpy copies of replicated (or fully addressable) arrays; works on every process of a multi-process run,
    where `jax.device_get` refuses arrays spanning other processes' devices."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"array of shape {x.shape} is sharded over other processes; gather it first")
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def sharded_fraction(shardings: Any, abstract: Any) -> float:
    """Fraction of parameter elements stored sharded (not fully replicated): for tests and logs."""
    total = sharded = 0
    for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
        n = math.prod(np.shape(a))
        total += n
        if not s.is_fully_replicated:
            sharded += n
    return sharded / max(total, 1)
