"""Strict, mechanical PyTorch state dict -> Flax parameter tree conversion.

Rule (diffusers/transformers naming): split the key on ".", join an index to the name before it
(`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/weight`), then map the leaf:
`weight` -> `kernel` (Linear: transpose; Conv2d (O,I,kh,kw) -> (kh,kw,I,O); Conv3d (O,I,kt,kh,kw) ->
(kt,kh,kw,I,O); a Conv1d/Conv2d with a 1-sized kernel where the target is a Dense -> squeezed Linear), `scale`
(norms) or `embedding` (embeddings), whichever the target tree has. Every source tensor must be used exactly once and every target filled with the right shape;
otherwise `ConversionError` lists each missing key, unexpected key and shape mismatch by name.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

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
    if arr.ndim >= 3 and target_ndim == 2 and all(k == 1 for k in arr.shape[2:]):  # 1x1 conv used as a Linear
        arr = arr.reshape(arr.shape[:2])
    if arr.ndim == 2:
        return arr.T
    if arr.ndim >= 3:  # ConvNd (O, I, *k) -> (*k, I, O)
        return np.transpose(arr, tuple(range(2, arr.ndim)) + (1, 0))
    return arr


def _flax_shape(shape: tuple, leaf: str, target_ndim: int) -> tuple:
    if leaf != "kernel":
        return tuple(shape)
    if len(shape) >= 3 and target_ndim == 2 and all(k == 1 for k in shape[2:]):
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
    display: Optional[Callable[[str], str]] = None,
) -> dict[str, tuple[str, ...]]:
    """Maps every source key to its target path, checking names and shapes only (nothing is loaded).

    Raises `ConversionError` listing missing keys, unexpected keys, shape mismatches and double fills.
    `display(key)` is how a source key is named in that message (e.g. with its name before a renaming).
    """
    show = display or (lambda k: k)
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
            unexpected.append(show(key))
            continue
        dst = hits[0]
        if dst in seen:
            duplicated.append(f"{show(key)} -> {'/'.join(dst)}")
            continue
        seen.add(dst)
        want = tuple(flat_target[dst].shape)
        got = _flax_shape(tuple(shape), dst[-1], len(want))
        if got != want:
            mismatched.append(f"{show(key)}: source {tuple(shape)} -> {got}, expected {'/'.join(dst)} {want}")
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
    return convert_lazy({k: tuple(np.shape(v)) for k, v in state.items()}, lambda k: state[k], target_shapes,
                        what=what, ignore=ignore)


def to_float32(arr) -> np.ndarray:
    """Floating arrays (float16/bfloat16/float64) as float32 numpy; integer arrays unchanged."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)
    return arr


def convert_lazy(
    source_shapes: Mapping[str, tuple],
    load: Callable[[str], Any],
    target_shapes: Mapping,
    *,
    what: str = "checkpoint",
    ignore: Optional[Callable[[str], bool]] = None,
    display: Optional[Callable[[str], str]] = None,
    put: Optional[Callable[[np.ndarray], Any]] = None,
) -> dict:
    """`convert_state_dict` for checkpoints too large to hold twice: names and shapes are checked first
    (`plan_conversion`, nothing loaded), then each tensor is loaded with `load(key)`, converted, and handed to
    `put` (e.g. a cast + device transfer) before the next one is read.
    """
    plan = plan_conversion(source_shapes, target_shapes, what=what, ignore=ignore, display=display)
    flat_target = traverse_util.flatten_dict(dict(target_shapes))
    out = {}
    for key, dst in plan.items():
        arr = np.array(_to_flax(to_float32(load(key)), dst[-1], len(flat_target[dst].shape)), order="C")  # keeps 0-d
        out[dst] = arr if put is None else put(arr)
    return traverse_util.unflatten_dict(out)
