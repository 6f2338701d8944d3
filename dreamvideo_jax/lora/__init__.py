"""Low-rank adapters (LoRA): training, adapter files, stacking and merging.

An adapter adds a low-rank update to chosen kernels of the model groups (`unet`, `retention`, `image_conv`):

  W' = W + scale * (alpha / rank) * reshape(A @ B)      A: (fan_in, rank), B: (rank, fan_out)

where `fan_in` is the product of all kernel axes but the last (a Dense kernel `(I, O)` has `fan_in = I`; a
convolution `(*k, I, O)` has `prod(k) * I`, as peft's conv adapters, whose A is a convolution of the same size and
whose B is 1x1). B starts at zero, so a fresh adapter leaves the model unchanged; A starts as peft's
(uniform in +-1/sqrt(fan_in)). The update is computed in float32 and cast to the kernel's dtype.

The update is applied to the weights, not to activations: `apply(params, adapters)` is a pure function used
inside the jitted train step (the base stays frozen; only A and B are trained and have optimizer state), by the
sampler at load ("merged": no per-step cost) or inside each denoising step ("unmerged": the base weights stay
untouched and the scales are inputs), and by `python -m dreamvideo_jax.lora merge` (`lora/__main__.py`). Input dropout on the adapter
branch (peft's `lora_dropout`) is not available: it has no weight-space form.

Which kernels: `train.lora.targets`, regexes over '/'-joined parameter paths (`unet/.../attn1/to_q/kernel`) or the
names of `PRESETS`; only Dense and convolution kernels (leaves named `kernel`, 2 or more axes) are adapted.

Adapter files (a folder, as peft writes them):

  DIR/adapter_model.safetensors   `<group>.<diffusers module name>.lora_A.weight` / `.lora_B.weight` in PyTorch
                                  layout: A `(r, I[, *k])`, B `(O, r[, 1, ...])`; e.g.
                                  `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`
  DIR/adapter_config.json         peft's keys (`peft_type`, `r`, `lora_alpha`, `target_modules`, ...) plus
                                  `targets` (the regexes) and `base_shapes` (the adapted kernels' shapes)

Parameter paths map to names by the converter's rule (`convert.torch_to_flax.flax_path`, read backwards), so the
U-Net's adapters carry the names of the diffusers layers they adapt; the retention branch and image conv block,
which diffusers does not have, keep this project's names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dreamvideo_jax.errors import CheckpointError, InputError
from dreamvideo_jax.tree_paths import SEP, flatten as _flatten, unflatten as _unflatten

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"

class AdapterError(CheckpointError):
    """An adapter file that cannot be used (unreadable, inconsistent, or made for another model)."""


# Named target sets (regexes over parameter paths).
PRESETS = {
    # The primary U-Net's attention projections (spatial, temporal and the input transformer): diffusers' and
    # peft's usual LoRA targets.
    "attention": r"^unet/.*/(to_q|to_k|to_v|to_out_0)/kernel$",
    # Every Dense / convolution kernel of the primary U-Net's temporal layers (temporal convs, temporal
    # transformers, the input transformer).
    "temporal": r"^unet/(.*/)?(temp_convs_\d+|temp_attentions_\d+|transformer_in)/.*kernel$",
    # The image-retention branch and the image conv block.
    "branch": r"^(retention|image_conv|reference_skip)/.*kernel$",
}
DEFAULT_TARGETS = ("attention",)

# diffusers module names that end in `_<digits>` themselves (not a list index); see `module_name`.
_NAMES_WITH_DIGITS = ("linear_1", "linear_2")


def defaults() -> ml_collections.ConfigDict:
    """The `train.lora` config section: off unless `rank > 0`."""
    return ml_collections.ConfigDict(dict(
        rank=0,  # > 0: train low-rank adapters of this rank instead of `train.trainable`'s full parameters
        alpha=0.0,  # the update is scaled by alpha / rank; 0 = rank (scale 1)
        targets=(),  # regexes over parameter paths, or names of lora.PRESETS; () = ('attention',)
    ))


@dataclasses.dataclass(frozen=True)
class Spec:
    """What to adapt: rank, alpha and target patterns (names of `PRESETS` or regexes)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def factor(self) -> float:
        """alpha / rank, the multiplier of A @ B."""
        return float(self.alpha or self.rank) / float(self.rank)


def spec_from_config(config) -> Spec | None:
    """The `train.lora` section of a config as a Spec; None when LoRA is off (rank 0 or no section)."""
    train = config.get("train") if hasattr(config, "get") else None
    lora = (train or {}).get("lora") if train is not None else None
    if lora is None or int(lora.get("rank", 0) or 0) <= 0:
        return None
    targets = lora.get("targets") or ()
    targets = ((targets,) if isinstance(targets, str) else tuple(targets)) or DEFAULT_TARGETS
    return Spec(int(lora["rank"]), float(lora.get("alpha", 0.0) or 0.0), targets)


def check_config(lora) -> None:
    """Checks a `train.lora` section (raises ValueError naming the key)."""
    unknown = sorted(set(lora) - set(defaults()))
    if unknown:
        raise ValueError(f"train.lora: unknown config keys {unknown}; known keys are {sorted(defaults())}")
    if int(lora.rank) < 0:
        raise ValueError(f"train.lora.rank={lora.rank} must be >= 0 (0 = no adapters)")
    if float(lora.alpha) < 0:
        raise ValueError(f"train.lora.alpha={lora.alpha} must be >= 0 (0 = rank)")
    targets = lora.targets or ()
    for t in (targets,) if isinstance(targets, str) else tuple(targets):
        pattern(t)


def pattern(target: str) -> re.Pattern:
    """A target (a preset name or a regex) compiled."""
    try:
        return re.compile(PRESETS.get(target, target))
    except re.error as e:
        raise ValueError(f"train.lora.targets: {target!r} is neither a preset ({', '.join(PRESETS)}) nor a valid "
                         f"regex ({e})") from None


def is_adaptable(path: str, shape: tuple) -> bool:
    return path.rsplit(SEP, 1)[-1] == "kernel" and len(shape) >= 2


def match(model_params: dict, targets: Sequence[str]) -> list[str]:
    """Sorted paths of the Dense / convolution kernels of `model_params` (the model groups of the layout, arrays or
    ShapeDtypeStructs) that a target matches (`re.search`).

    Raises:
        ValueError: a target that matches no such kernel (naming it and what paths look like).
    """
    kernels = [k for k, v in _flatten(model_params).items() if is_adaptable(k, tuple(np.shape(v)))]
    out = set()
    for t in targets:
        p = pattern(t)
        hits = [k for k in kernels if p.search(k)]
        if not hits:
            example = next((k for k in kernels if k.startswith("unet/") and "to_q" in k), kernels[0] if kernels else "")
            raise ValueError(f"train.lora.targets: {t!r} matches no Dense or convolution kernel (paths look like "
                             f"{example!r}; presets: {', '.join(PRESETS)})")
        out.update(hits)
    return sorted(out)


def factor_shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of A and B for a kernel."""
    return (int(np.prod(kernel_shape[:-1])), rank), (rank, int(kernel_shape[-1]))


# ----------------------------------------------------------------------------------------------------------------
# Adapter trees: {kernel path: {'a': A, 'b': B}} as a nested dict (`unet/.../to_q/kernel/a`)


def abstract(model_abstract: dict, spec: Spec, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of the adapter tree of `spec` over the model groups' abstract parameters."""
    flat = _flatten(model_abstract)
    out = {}
    for path in match(model_abstract, spec.targets):
        sa, sb = factor_shapes(flat[path].shape, spec.rank)
        out[f"{path}{SEP}a"] = jax.ShapeDtypeStruct(sa, dtype)
        out[f"{path}{SEP}b"] = jax.ShapeDtypeStruct(sb, dtype)
    return _unflatten(out)


def init(tree_abstract: dict, key: jax.Array) -> dict:
    """A fresh adapter tree: A uniform in +-1/sqrt(fan_in) (peft's default), B zero. Traceable."""
    flat = _flatten(tree_abstract)
    out = {}
    for i, (path, s) in enumerate(sorted(flat.items())):
        if path.endswith(f"{SEP}a"):
            bound = 1.0 / math.sqrt(s.shape[0])
            out[path] = jax.random.uniform(jax.random.fold_in(key, i), s.shape, s.dtype, -bound, bound)
        else:
            out[path] = jnp.zeros(s.shape, s.dtype)
    return _unflatten(out)


def pairs(tree: dict) -> dict[str, tuple[Any, Any]]:
    """An adapter tree -> {kernel path: (A, B)}."""
    flat = _flatten(tree)
    out = {}
    for k in flat:
        if k.endswith(f"{SEP}a"):
            base = k[: -2]
            out[base] = (flat[k], flat[f"{base}{SEP}b"])
    return out


def delta(a, b, shape: Sequence[int], factor) -> Any:
    """factor * reshape(A @ B) in float32 (numpy for numpy inputs, else jax)."""
    xp = np if all(isinstance(x, np.ndarray) for x in (a, b)) and not isinstance(factor, jax.Array) else jnp
    d = xp.matmul(xp.asarray(a, xp.float32), xp.asarray(b, xp.float32)) * xp.asarray(factor, xp.float32)
    return d.reshape(tuple(shape))


def apply(params: dict, adapters: Sequence[tuple[dict, Any]]) -> dict:
    """`params` (a layout tree, or its model groups) with every adapter's update added to its kernels.

    Args:
        params: arrays (numpy or jax; traceable).
        adapters: `(tree, factor)` pairs; `factor` multiplies A @ B (`user scale * alpha / rank`), a float or a
            scalar array (then a traced input, so changing it does not recompile).

    Raises:
        CheckpointError: an adapter for a kernel `params` lacks, or of another shape (naming the first).
    """
    flat = _flatten(params)
    deltas: dict[str, Any] = {}
    for tree, factor in adapters:
        for path, (a, b) in pairs(tree).items():
            if path not in flat:
                raise CheckpointError(f"adapter for {path}: the model has no such parameter")
            shape = tuple(np.shape(flat[path]))
            want = factor_shapes(shape, int(np.shape(a)[1]))
            if (tuple(np.shape(a)), tuple(np.shape(b))) != want:
                raise CheckpointError(f"adapter for {path}: A {tuple(np.shape(a))}, B {tuple(np.shape(b))} do not "
                                      f"fit the kernel {shape} (want {want[0]}, {want[1]})")
            d = delta(a, b, shape, factor)
            deltas[path] = d if path not in deltas else deltas[path] + d
    if not deltas:
        return params
    for path, d in deltas.items():
        w = flat[path]
        if isinstance(w, np.ndarray) and isinstance(d, np.ndarray):
            flat[path] = (w.astype(np.float32) + d).astype(w.dtype)
        else:
            flat[path] = (jnp.asarray(w, jnp.float32) + d).astype(w.dtype)
    out = _unflatten(flat)
    for k, v in params.items():  # keep empty groups (the patch autoencoder's 'vae')
        out.setdefault(k, v)
    return out


def num_params(tree: dict) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------------------------------------------
# Names: parameter paths <-> peft/diffusers keys


def module_name(path: str) -> str:
    """`unet/down_blocks_0/attentions_0/.../to_out_0/kernel` -> `unet.down_blocks.0.attentions.0....to_out.0`:
    the inverse of the converter's `flax_path` (an index joined to the name before it), so a U-Net layer gets its
    diffusers name."""
    parts = path.split(SEP)
    if parts[-1] == "kernel":
        parts = parts[:-1]
    out = []
    for p in parts:
        m = re.fullmatch(r"(.+?)_(\d+)", p)
        out.append(f"{m.group(1)}.{m.group(2)}" if m and p not in _NAMES_WITH_DIGITS else p)
    return ".".join(out)


def kernel_path(name: str) -> str:
    """The inverse of :func:`module_name` (the converter's rule)."""
    from dreamvideo_jax.convert.torch_to_flax import flax_path

    return SEP.join(flax_path(name)) + SEP + "kernel"


def to_torch(a: np.ndarray, b: np.ndarray, kernel_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A `(fan_in, r)`, B `(r, O)` -> peft's lora_A.weight `(r, I, *k)` / lora_B.weight `(O, r, 1, ...)` (Dense:
    `(r, I)` / `(O, r)`)."""
    r = a.shape[1]
    k = tuple(kernel_shape[:-2])
    a_t = np.moveaxis(np.asarray(a).reshape(k + (kernel_shape[-2], r)), -1, 0)  # (r, *k, I)
    a_t = np.moveaxis(a_t, -1, 1) if k else a_t  # (r, I, *k)
    b_t = np.asarray(b).T.reshape((kernel_shape[-1], r) + (1,) * len(k))
    return np.ascontiguousarray(a_t), np.ascontiguousarray(b_t)


def from_torch(a_t: np.ndarray, b_t: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The inverse of :func:`to_torch`: (A, B, the kernel shape they imply)."""
    r, i, k = a_t.shape[0], a_t.shape[1], tuple(a_t.shape[2:])
    a = np.moveaxis(a_t, 1, -1) if k else a_t  # (r, *k, I)
    a = np.moveaxis(a, 0, -1).reshape(-1, r)
    b = b_t.reshape(b_t.shape[0], -1).T
    return a, b, k + (i, b_t.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Adapter files


@dataclasses.dataclass
class Adapter:
    """A loaded adapter: its tree (numpy), rank, alpha, targets and where it came from."""

    tree: dict
    rank: int
    alpha: float
    targets: tuple[str, ...]
    source: str = ""
    kernel_shapes: dict = dataclasses.field(default_factory=dict)  # {kernel path: shape the factors imply}

    @property
    def factor(self) -> float:
        return float(self.alpha or self.rank) / float(self.rank)


def save(directory: str, tree: dict, spec: Spec, kernel_shapes: dict[str, Sequence[int]],
         dtype=np.float32) -> str:
    """Writes an adapter folder (`WEIGHTS_FILE` + `CONFIG_FILE`); returns the folder."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors, modules = {}, []
    factors = pairs(jax.device_get(tree))
    for path, (a, b) in sorted(factors.items()):
        a_t, b_t = to_torch(np.asarray(a, np.float32), np.asarray(b, np.float32), kernel_shapes[path])
        name = module_name(path)
        tensors[f"{name}.lora_A.weight"] = a_t.astype(dtype)
        tensors[f"{name}.lora_B.weight"] = b_t.astype(dtype)
        modules.append(name)
    if not tensors:
        raise ValueError("an adapter with no tensors cannot be saved")
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    meta = {
        "peft_type": "LORA", "r": int(spec.rank), "lora_alpha": float(spec.alpha or spec.rank),
        "lora_dropout": 0.0, "bias": "none", "target_modules": modules, "use_dora": False,
        "targets": list(spec.targets),
        "base_shapes": {module_name(p): list(map(int, kernel_shapes[p])) for p in sorted(factors)},
    }
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    return directory


def parse_arg(value: str) -> tuple[str, float]:
    """`PATH[:scale]` -> (PATH, scale); scale defaults to 1. A tail after the last ':' that is not a number is part
    of the path (`gs://bucket/adapter` has no scale)."""
    path, _, tail = value.rpartition(":")
    try:
        return (path, float(tail)) if path else (value, 1.0)
    except ValueError:
        return value, 1.0


def _files(path: str, flag: str) -> tuple[str, str]:
    path = os.fspath(path).rstrip("/")
    if not os.path.exists(path):
        raise InputError(flag, path, "no such file or directory")
    if os.path.isdir(path):
        weights, config = os.path.join(path, WEIGHTS_FILE), os.path.join(path, CONFIG_FILE)
    else:
        weights, config = path, os.path.join(os.path.dirname(path), CONFIG_FILE)
    for f in (weights, config):
        if not os.path.isfile(f):
            raise InputError(flag, path, f"not an adapter: {f} is missing (an adapter folder holds {WEIGHTS_FILE} and "
                                         f"{CONFIG_FILE})")
    return weights, config


def load(path: str, flag: str = "lora") -> Adapter:
    """Reads an adapter folder (or its .safetensors file, with the config beside it).

    Raises:
        InputError: a missing path or file (naming `--{flag}`).
        CheckpointError: unreadable files, a key that is not a LoRA factor, a rank that differs from the config's.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights, config = _files(path, flag)
    try:
        with open(config) as f:
            meta = json.load(f)
        rank = int(meta["r"])
        alpha = float(meta.get("lora_alpha", rank))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AdapterError(f"adapter {path}: {config} is not a LoRA config ({type(e).__name__}: {e})") from None
    try:
        tensors = load_file(weights)
    except (OSError, SafetensorError) as e:
        raise AdapterError(f"adapter {path}: {weights} is unreadable ({' '.join(str(e).split())})") from None
    flat, shapes = {}, {}
    for key in sorted(tensors):
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise AdapterError(f"adapter {path}: key {key!r} is not a LoRA factor (<module>.lora_A.weight or "
                                  f".lora_B.weight)")
        if m.group(2) == "B":
            continue
        name = m.group(1)
        b_key = key.replace(".lora_A", ".lora_B")
        if b_key not in tensors:
            raise AdapterError(f"adapter {path}: {key} has no {b_key}")
        a_t, b_t = np.asarray(tensors[key]), np.asarray(tensors[b_key])
        if a_t.shape[0] != rank or b_t.shape[1] != rank:
            raise AdapterError(f"adapter {path}: rank mismatch: {CONFIG_FILE} says r={rank} but {key} is "
                                  f"{tuple(a_t.shape)} and {b_key} {tuple(b_t.shape)}")
        a, b, kshape = from_torch(a_t.astype(np.float32), b_t.astype(np.float32))
        kp = kernel_path(name)
        flat[f"{kp}{SEP}a"], flat[f"{kp}{SEP}b"] = a, b
        shapes[kp] = kshape
    if not flat:
        raise AdapterError(f"adapter {path}: {weights} holds no LoRA factors")
    return Adapter(_unflatten(flat), rank, alpha, tuple(meta.get("targets") or meta.get("target_modules") or ()),
                   source=os.fspath(path), kernel_shapes=shapes)


def check_fits(adapter: Adapter, model_abstract: dict) -> None:
    """Raises CheckpointError naming the first adapted kernel the model lacks or has in another shape."""
    flat = _flatten(model_abstract)
    for path, shape in sorted(adapter.kernel_shapes.items()):
        name = module_name(path)
        if path not in flat:
            raise AdapterError(f"adapter {adapter.source} does not fit the model: the model has no {name} "
                                  f"({path}) for {name}.lora_A.weight")
        have = tuple(flat[path].shape)
        if have != tuple(shape):
            want_a, want_b = to_torch(*[np.zeros(s, np.float32) for s in factor_shapes(have, adapter.rank)], have)
            got_a, got_b = to_torch(*[np.zeros(s, np.float32) for s in factor_shapes(shape, adapter.rank)], shape)
            raise AdapterError(f"adapter {adapter.source} does not fit the model: {name}.lora_A.weight "
                                  f"{got_a.shape} / lora_B {got_b.shape} are for a kernel {tuple(shape)}, the "
                                  f"model's {path} is {have} (lora_A {want_a.shape}, lora_B {want_b.shape})")


def load_all(values: Sequence[str], model_abstract: dict | None = None, flag: str = "lora"
             ) -> list[tuple[Adapter, float]]:
    """`PATH[:scale]` values -> [(adapter, scale)], each checked against `model_abstract` when given."""
    out = []
    for v in values:
        path, scale = parse_arg(v)
        a = load(path, flag)
        if model_abstract is not None:
            check_fits(a, model_abstract)
        out.append((a, scale))
    return out


def stack(adapters: Sequence[tuple[Adapter, float]]) -> list[tuple[dict, float]]:
    """`(adapter, scale)` pairs -> the `(tree, factor)` pairs :func:`apply` takes."""
    return [(a.tree, float(scale) * a.factor) for a, scale in adapters]
