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


def _to_flax(arr: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    if leaf != "kernel":
        return arr
    if arr.ndim == 3 and target_ndim == 2 and arr.shape[-1] == 1:  # Conv1d(k=1) used as a Linear
        arr = arr[..., 0]
    if arr.ndim == 2:
        return arr.T
    if arr.ndim >= 3:  # ConvNd (O, I, *k) -> (*k, I, O)
        return np.transpose(arr, tuple(range(2, arr.ndim)) + (1, 0))
    return arr


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
    flat_target = traverse_util.flatten_dict(dict(target_shapes))
    out: dict[tuple, np.ndarray] = {}
    unexpected, mismatched, duplicated = [], [], []
    seen: set[tuple] = set()
    for key, arr in state.items():
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
        arr = np.asarray(arr)
        if arr.dtype.kind == "f" or arr.dtype.name == "bfloat16":
            arr = arr.astype(np.float32)
        want = tuple(flat_target[dst].shape)
        conv = _to_flax(arr, dst[-1], len(want))
        if dst in seen:
            duplicated.append(f"{key} -> {'/'.join(dst)}")
            continue
        seen.add(dst)
        if tuple(conv.shape) != want:
            mismatched.append(f"{key}: source {tuple(arr.shape)} -> {tuple(conv.shape)}, expected "
                              f"{'/'.join(dst)} {want}")
            continue
        out[dst] = np.ascontiguousarray(conv)
    missing = sorted("/".join(p) for p in flat_target if p not in seen)
    if unexpected or mismatched or missing or duplicated:
        lines = [f"{what}: state dict does not match the architecture"]
        for title, items in (("missing (not in the checkpoint)", missing), ("unexpected (not in the model)", unexpected),
                             ("shape mismatch", mismatched), ("filled twice", duplicated)):
            if items:
                shown = items[:50]
                lines.append(f"  {title} [{len(items)}]: " + ", ".join(shown) + (" ..." if len(items) > 50 else ""))
        raise ConversionError("\n".join(lines))
    return traverse_util.unflatten_dict(out)

