"""Parameter paths: a nested parameter dict <-> a flat dict keyed by '/'-joined paths
(`unet/down_blocks_0/temp_convs_0/.../kernel`), the names every trainable regex, LoRA target and checkpoint merge
uses."""

from __future__ import annotations

from typing import Any

from flax import traverse_util

SEP = "/"


def flatten(tree: dict) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep=SEP) if tree else {}


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep=SEP) if flat else {}
