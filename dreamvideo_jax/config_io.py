"""Configs as plain data: ConfigDict <-> dict / JSON, and the differences between two configs."""

from __future__ import annotations

import json
from typing import Any

import ml_collections


def to_dict(config) -> dict:
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def json_default(x):
    """`json.dumps(default=...)` for config values: tuples as lists, numpy scalars as numbers."""
    if isinstance(x, tuple):
        return list(x)
    try:
        return x.item()
    except AttributeError:
        return str(x)


def to_json(config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True, default=json_default)


def normalize(x: Any) -> Any:
    """JSON round-trip normal form (tuples become lists), so two configs compare by value."""
    return json.loads(json.dumps(x, default=json_default))


def flat(d: Any, prefix: str = "") -> dict:
    """`{'a.b.c': value}` of a nested dict."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def diff(a: dict, b: dict) -> list[str]:
    """'key: a -> b' lines for keys whose values differ between two (nested) dicts."""
    fa, fb = flat(normalize(a)), flat(normalize(b))
    out = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, "<absent>"), fb.get(k, "<absent>")
        if va != vb:
            out.append(f"{k}: {va!r} -> {vb!r}")
    return out
