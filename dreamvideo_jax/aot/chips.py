"""Cloud TPU chips and slice names: HBM, peak bf16 FLOP/s and HBM bandwidth per chip, and the topology of a slice.

Figures are Google's published per-chip numbers (Cloud TPU system architecture pages):
  v4   https://cloud.google.com/tpu/docs/v4    275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s
  v5e  https://cloud.google.com/tpu/docs/v5e   197 TFLOP/s bf16, 16 GiB HBM2, 819 GB/s
  v5p  https://cloud.google.com/tpu/docs/v5p   459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s
  v6e  https://cloud.google.com/tpu/docs/v6e   918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s

A slice is named either by its topology (``v5e:4x4``, ``v4:2x2x4``: chips along each ICI axis) or by its
accelerator type as `gcloud` spells it (``v5litepod-16``/``v5e-16``, ``v6e-8``: chips; ``v4-32``, ``v5p-8``:
TensorCores, two per chip). v4 and v5p chips run as one device each (megacore), as on Cloud TPU VMs.
"""

from __future__ import annotations

import dataclasses
import math
import re

from dreamvideo_jax.errors import InputError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # 'v5e'
    device_kind: str  # jax's Device.device_kind
    hbm_bytes: int
    bf16_flops: float  # peak dense bf16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    dims: int  # ICI topology dimensions (2: v5e/v6e tori, 3: v4/v5p)
    cores_per_chip: int  # TensorCores per chip, as counted in accelerator types ('v4-32' = 16 chips)
    source: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, 275e12, 1200e9, 3, 2, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819e9, 2, 1, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", "TPU v5", 95 * GIB, 459e12, 2765e9, 3, 2, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GIB, 918e12, 1640e9, 2, 1, "https://cloud.google.com/tpu/docs/v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    chip: Chip
    topology: str  # 'v5e:4x4', what jax.experimental.topologies takes
    chips: int
    options: tuple = ()  # extra keyword arguments of get_topology_desc, as (name, value) pairs

    @property
    def hbm_bytes_total(self) -> int:
        return self.chips * self.chip.hbm_bytes


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The usual slice shape of `chips` chips: a host is 2x2(x1); axes grow in powers of two, smallest first."""
    if chips < 4 or chips & (chips - 1):
        raise ValueError(chips)
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        shape[min(range(dims), key=lambda a: (shape[a], -a))] *= 2  # the smallest axis, the last of equals
    return tuple(sorted(shape)) if dims == 2 else tuple(shape)


def parse(spec: str) -> Slice:
    """A slice from ``v5e:4x4`` (topology) or ``v5litepod-16`` / ``v4-32`` (accelerator type).

    Raises:
        InputError: naming the spec and the forms accepted.
    """
    spec = (spec or "").strip()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", spec)
    if m:
        chip = _chip(m.group(1), spec)
        name = chip.name
        dims = tuple(int(d) for d in m.group(2).split("x"))
        if len(dims) != chip.dims:
            raise InputError("topology", spec, f"a {name} topology has {chip.dims} dimensions, e.g. "
                             f"{name}:{'x'.join(['2'] * chip.dims)}")
        return Slice(chip, f"{name}:{m.group(2)}", math.prod(dims), _options(chip))
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", spec)
    if m:
        chip = _chip(m.group(1), spec)
        name = chip.name
        n = int(m.group(2))
        if n % chip.cores_per_chip:
            raise InputError("topology", spec, f"{name} accelerator types count TensorCores, "
                             f"{chip.cores_per_chip} per chip")
        chips = n // chip.cores_per_chip
        try:
            shape = _grid(chips, chip.dims)
        except ValueError:
            raise InputError("topology", spec, f"{chips} chips: slices of 4, 8, 16, ... chips are supported "
                             f"(name a topology instead, e.g. {name}:{'x'.join(['2'] * chip.dims)})") from None
        return Slice(chip, f"{name}:{'x'.join(map(str, shape))}", chips, _options(chip))
    raise InputError("topology", spec, "expected a topology such as v5e:4x4 or v4:2x2x2, or an accelerator type "
                     "such as v5litepod-16, v6e-8, v4-32 or v5p-8")


def _chip(generation: str, spec: str) -> Chip:
    name = _ALIASES.get(generation, generation)
    if name not in CHIPS:
        raise InputError("topology", spec, f"unknown TPU generation {generation!r}; known: {', '.join(sorted(CHIPS))}")
    return CHIPS[name]


def _options(chip: Chip) -> tuple:
    return (("chip_config_name", "megacore"),) if chip.name == "v4" else ()
