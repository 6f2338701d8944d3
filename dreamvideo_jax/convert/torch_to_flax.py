"""Strict, mechanical PyTorch state dict -> Flax parameter tree conversion.

Rule (diffusers/transformers naming): split the key on ".", join an index to the name before it
(`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/weight`), then map the leaf:
`weight` -> `kernel` (Linear: transpose; Conv2d (O,I,kh,kw) -> (kh,kw,I,O); Conv3d (O,I,kt,kh,kw) ->
(kt,kh,kw,I,O); Conv1d with k=1 -> squeezed Linear), `scale` (norms) or `embedding` (embeddings), whichever the
target tree has. Every source tensor must be used exactly once and every target filled with the right shape;
otherwise `ConversionError` lists each missing key, unexpected key and shape mismatch by name.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import numpy as np
from flax import traverse_util


class ConversionError(ValueError):
    """A state dict does not match the target architecture; the message lists every problem by name."""


def flax_path(key: str) -> tuple[str, ...]:
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _to_flax(arr, leaf: str, target_ndim: int):
    """Layout change torch -> flax for one tensor (works on numpy arrays)."""
    if leaf != "kernel":
        return arr
    if arr.ndim == 3 and target_ndim == 2 and arr.shape[-1] == 1:  # Conv1d(k=1) used as a Linear
        arr = arr[..., 0]
    if arr.ndim == 2:
        return arr.T
    if arr.ndim >= 3:  # ConvNd (O, I, *k) -> (*k, I, O)
        return np.transpose(arr, tuple(range(2, arr.ndim)) + (1, 0))
    return arr


def _flax_shape(shape: tuple, leaf: str, target_ndim: int) -> tuple:
    if leaf != "kernel":
        return tuple(shape)
    if len(shape) == 3 and target_ndim == 2 and shape[-1] == 1:
        shape = shape[:2]
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) >= 3:
        return tuple(shape[2:]) + (shape[1], shape[0])
    return tuple(shape)


def plan_conversion(
    source_shapes: Mapping[str, tuple],
    target_shapes: Mapping,
    *,
    what: str = "checkpoint",
    ignore: Optional[Callable[[str], bool]] = None,
) -> dict[str, tuple[str, ...]]:
    """Maps every source key to its target path, checking names and shapes only (nothing is loaded).

    Raises `ConversionError` listing missing keys, unexpected keys, shape mismatches and double fills.
    """
    flat_target = traverse_util.flatten_dict(dict(target_shapes))
    plan: dict[str, tuple[str, ...]] = {}
    unexpected, mismatched, duplicated = [], [], []
    seen: set[tuple] = set()
    for key, shape in source_shapes.items():
        if ignore is not None and ignore(key):
            continue
        path = flax_path(key)
        base, leaf = path[:-1], path[-1]
        names = {"weight": ("kernel", "scale", "embedding"), "gamma": ("scale",), "beta": ("bias",)}.get(leaf, (leaf,))
        hits = [base + (n,) for n in names if base + (n,) in flat_target]
        if len(hits) != 1:
            unexpected.append(key)
            continue
        dst = hits[0]
        if dst in seen:
            duplicated.append(f"{key} -> {'/'.join(dst)}")
            continue
        seen.add(dst)
        want = tuple(flat_target[dst].shape)
        got = _flax_shape(tuple(shape), dst[-1], len(want))
        if got != want:
            mismatched.append(f"{key}: source {tuple(shape)} -> {got}, expected {'/'.join(dst)} {want}")
            continue
        plan[key] = dst
    missing = sorted("/".join(p) for p in flat_target if p not in seen)
    if unexpected or mismatched or missing or duplicated:
        lines = [f"{what}: state dict does not match the architecture"]
        for title, items in (("missing (not in the checkpoint)", missing), ("unexpected (not in the model)", unexpected),
                             ("shape mismatch", mismatched), ("filled twice", duplicated)):
            if items:
                lines.append(f"  {title} [{len(items)}]: " + ", ".join(items[:50]) + (" ..." if len(items) > 50 else ""))
        raise ConversionError("\n".join(lines))
    return plan


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    target_shapes: Mapping,
    *,
    what: str = "checkpoint",
    ignore: Optional[Callable[[str], bool]] = None,
) -> dict:
    """Converts `state` (torch key -> array) into a nested dict shaped like `target_shapes`.

    Args:
      state: source tensors as numpy arrays (float16/bfloat16 are upcast to float32).
      target_shapes: nested dict whose leaves have `.shape` (e.g. `jax.eval_shape(init)['params']`, unboxed).
      what: a name for the source, used in error messages (e.g. the file path).
      ignore: source keys for which this returns True are dropped on purpose (e.g. unused text layers).
    """
    plan = plan_conversion({k: tuple(np.shape(v)) for k, v in state.items()}, target_shapes, what=what, ignore=ignore)
    flat_target = traverse_util.flatten_dict(dict(target_shapes))
    out = {}
    for key, dst in plan.items():
        arr = np.asarray(state[key])
        if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)
        out[dst] = np.ascontiguousarray(_to_flax(arr, dst[-1], len(flat_target[dst].shape)))
    return traverse_util.unflatten_dict(out)
