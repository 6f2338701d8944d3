"""Reading PyTorch checkpoints without PyTorch: safetensors files, shards and precision variants.

A component folder in diffusers/transformers layout holds one of
  * `diffusion_pytorch_model.safetensors` (diffusers) or `model.safetensors` (transformers);
  * a precision variant, e.g. `diffusion_pytorch_model.fp16.safetensors`;
  * shards listed by `diffusion_pytorch_model.safetensors.index.json` / `model.safetensors.index.json`
    (variant indexes: `*.safetensors.index.fp16.json` or `*.fp16.safetensors.index.json`).
`open_weights(path)` finds the right file(s) and returns a `Weights` mapping that knows every tensor's name,
shape and dtype from the file headers and reads a tensor only when asked (`safetensors.safe_open`, numpy
framework; bfloat16 is read from the raw bytes, since numpy has no bfloat16, and viewed as `ml_dtypes.bfloat16`).

Pickled checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`) can run arbitrary code when loaded and are refused, with
the command that converts them; `allow_pickle=True` reads them with `torch.load(weights_only=True)` instead
(needs torch).
"""

from __future__ import annotations

import json
import math
import os
from typing import Iterator, Mapping, Optional

import numpy as np

SAFETENSORS_STEMS = ("diffusion_pytorch_model", "model")  # diffusers, transformers
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024

# safetensors dtype -> (numpy dtype name, itemsize). BF16 is handled through ml_dtypes.
_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be used as given; the message names the file and the problem."""


def pickle_message(path: str) -> str:
    return (
        f"{path} is a pickle checkpoint; pickles can run arbitrary code when loaded and are not read by default. "
        f"Convert it to safetensors once: python -c \"import torch; from safetensors.torch import save_file; "
        f"sd = torch.load('{path}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{os.path.splitext(path)[0]}.safetensors')\" "
        f"-- or pass allow_pickle=True (CLI: --allow_pickle) to read it with torch.load(weights_only=True)."
    )


def read_safetensors_header(path: str) -> tuple[dict, dict, int]:
    """(tensors, metadata, data_offset) of a safetensors file; checks that every tensor lies inside the file.

    `tensors` maps name -> {"dtype", "shape", "data_offsets"}. Raises `CheckpointError` naming the file for a
    file that is truncated or not safetensors.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header of {n} bytes claimed, "
                                  f"file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    end_max = 0
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which this reader does not support "
                                  f"(supported: {', '.join(_DTYPES)})")
        if end - begin != math.prod(shape) * _DTYPES[dtype][1] or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}")
        end_max = max(end_max, end)
    if end_max > data_size:
        raise CheckpointError(f"{path}: truncated -- the header describes {end_max} bytes of tensor data, the file "
                              f"holds {data_size}")
    return header, meta, 8 + n


class Weights(Mapping):
    """Read-only `name -> numpy array` view of one checkpoint (one or more files), loading on access.

    `shapes` / `dtypes` come from the headers; `files` lists the files; `describe` names the source in messages.
    Arrays keep their stored dtype (bfloat16 as `ml_dtypes.bfloat16`).
    """

    def __init__(self, entries: dict[str, tuple[str, dict, int]], files: list[str], describe: str):
        self._entries = entries  # name -> (file, header entry, data offset)
        self.files = files
        self.describe = describe
        self._handles: dict[str, object] = {}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(e[1]["shape"]) for k, e in self._entries.items()}

    @property
    def dtypes(self) -> dict[str, str]:
        return {k: e[1]["dtype"] for k, e in self._entries.items()}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __getitem__(self, key: str) -> np.ndarray:
        path, info, offset = self._entries[key]
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype == "BF16":
            import ml_dtypes

            begin = info["data_offsets"][0]
            raw = np.fromfile(path, dtype=np.uint16, count=math.prod(shape), offset=offset + begin)
            return raw.view(ml_dtypes.bfloat16).reshape(shape)
        handle = self._handles.get(path)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = self._handles[path] = safe_open(path, framework="numpy")
            except Exception as e:  # safetensors raises its own error type
                raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
        return handle.get_tensor(key)

    def close(self):
        self._handles.clear()


class _InMemory(Weights):
    """`Weights` over arrays already in memory (a pickle read with torch)."""

    def __init__(self, arrays: dict[str, np.ndarray], files: list[str], describe: str):
        names = {np_name: st_name for st_name, (np_name, _) in _DTYPES.items()}
        super().__init__({k: ("", {"shape": a.shape, "dtype": names.get(a.dtype.name, a.dtype.name)}, 0)
                          for k, a in arrays.items()}, files, describe)
        self._arrays = arrays

    def __getitem__(self, key):
        return self._arrays[key]


def _open_files(files: list[str], weight_map: Optional[dict[str, str]], describe: str) -> Weights:
    entries: dict[str, tuple[str, dict, int]] = {}
    for path in files:
        header, _, offset = read_safetensors_header(path)
        for name, info in header.items():
            if name in entries:
                raise CheckpointError(f"{describe}: tensor {name!r} is in both {entries[name][0]} and {path}")
            entries[name] = (path, info, offset)
    if weight_map is not None:
        wrong = [f"{k} (index says {os.path.basename(v)})" for k, v in weight_map.items()
                 if k not in entries or os.path.basename(entries[k][0]) != os.path.basename(v)]
        if wrong:
            raise CheckpointError(f"{describe}: the index lists tensors its shards do not hold: "
                                  + ", ".join(sorted(wrong)[:20]) + (" ..." if len(wrong) > 20 else ""))
    return Weights(entries, files, describe)


def _open_index(index_path: str) -> Weights:
    folder = os.path.dirname(index_path)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index (needs a 'weight_map'): {e}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: not a safetensors index ('weight_map' is not a JSON object)")
    for name, shard in weight_map.items():
        # Lexical check only: the files themselves may be symlinks (the Hugging Face cache links them to blobs).
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or (
                os.path.normpath(shard).split(os.sep)[0] == ".."):
            raise CheckpointError(f"{index_path}: weight_map entry {name!r}: {shard!r} is not a file name inside "
                                  f"{folder or '.'}; shard names must be relative (no absolute path, no '..')")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise CheckpointError(f"{index_path}: shard file(s) missing: {', '.join(missing)}")
    return _open_files([os.path.join(folder, s) for s in shards], weight_map, index_path)


def _read_pickle(path: str) -> Weights:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading a pickle checkpoint needs torch, which is not installed. "
                              + pickle_message(path)) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: torch.load(weights_only=True) failed: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), found {type(sd).__name__}")
    arrays = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        v = v.detach().contiguous()
        if v.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the bits, as ml_dtypes.bfloat16
            import ml_dtypes

            arrays[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            arrays[k] = v.numpy()
    return _InMemory(arrays, [path], path)


def _variant_names(stem: str, variant: Optional[str]) -> tuple[list[str], list[str]]:
    """(single-file names, index names) for a stem and variant (None = full precision)."""
    if variant is None:
        return [f"{stem}.safetensors"], [f"{stem}.safetensors.index.json"]
    return ([f"{stem}.{variant}.safetensors"],
            [f"{stem}.safetensors.index.{variant}.json", f"{stem}.{variant}.safetensors.index.json"])


def find_weights(folder: str, variant: Optional[str] = None) -> str:
    """The weights file (or shard index) of a component folder.

    Full precision is preferred; a precision variant (`fp16`, `bf16`, ...) is used when it is the only one
    present or when `variant` names it. Raises `FileNotFoundError` for a missing folder or no weights,
    `CheckpointError` when only pickles are present or the choice is ambiguous.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    names = set(os.listdir(folder))
    wanted = []
    for stem in SAFETENSORS_STEMS:
        singles, indexes = _variant_names(stem, variant)
        wanted += indexes + singles
    for n in wanted:
        if n in names:
            return os.path.join(folder, n)
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    if variant is not None:
        raise FileNotFoundError(f"{folder}: no '{variant}' weights (looked for {', '.join(wanted)}); "
                                f"safetensors present: {', '.join(safetensors) or 'none'}")
    # No full-precision weights: take the precision variant if there is exactly one.
    found = {}
    for n in names:
        for stem in SAFETENSORS_STEMS:
            for suffix in (".safetensors", ".safetensors.index.json"):
                if n.startswith(stem + ".") and n.endswith(suffix) and "-of-" not in n:
                    v = n[len(stem) + 1: -len(suffix)]
                    if v and "." not in v:
                        found.setdefault(v, n)
            if n.startswith(stem + ".safetensors.index.") and n.endswith(".json"):
                v = n[len(stem + ".safetensors.index."):-len(".json")]
                if v and "." not in v:
                    found[v] = n
    if len(found) == 1:
        return os.path.join(folder, next(iter(found.values())))
    if len(found) > 1:
        raise CheckpointError(f"{folder}: several precision variants ({', '.join(sorted(found))}); choose one "
                              f"with variant= (CLI: --variant)")
    if len(safetensors) == 1:
        return os.path.join(folder, safetensors[0])
    if len(safetensors) > 1:
        raise CheckpointError(f"{folder}: several .safetensors files and no index naming the shards: "
                              + ", ".join(safetensors))
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        return os.path.join(folder, pickles[0])
    raise FileNotFoundError(f"{folder}: no weights found (expected diffusion_pytorch_model.safetensors, "
                            f"model.safetensors or a *.safetensors.index.json with its shards)")


def open_weights(path: str, variant: Optional[str] = None, allow_pickle: bool = False) -> Weights:
    """Opens a checkpoint: a component folder, a `.safetensors` file, a shard index, or (with `allow_pickle`)
    a pickle. Nothing but the headers is read until tensors are accessed."""
    if os.path.isdir(path):
        path = find_weights(path, variant)
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise CheckpointError(pickle_message(path))
        return _read_pickle(path)
    if path.endswith(".json"):
        return _open_index(path)
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, a .safetensors.index.json "
                              f"or a folder holding them)")
    return _open_files([path], None, path)


__all__ = ["CheckpointError", "Weights", "find_weights", "open_weights", "read_safetensors_header",
           "pickle_message", "PICKLE_SUFFIXES"]
