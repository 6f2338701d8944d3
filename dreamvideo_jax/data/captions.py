"""Caption files (CSV / JSONL) and class-name captions (UCF101), read without ever raising on bad rows.

CSV: a header row naming at least ``path`` and ``caption`` (other columns are ignored, except an optional ``split``).
JSONL: one object per line with keys ``path`` and ``caption`` (and optionally ``split``). Paths are relative to
the video folder. A path listed several times keeps all its captions (MSR-VTT has 20 per video). Lines that are
not valid UTF-8 are decoded with replacement characters and counted.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
import re
from functools import lru_cache

CAPTION_FILES = ("captions.csv", "captions.jsonl", "captions.json")


@dataclasses.dataclass
class CaptionTable:
    """Captions per relative path (normalised with forward slashes), plus counts of repaired / dropped rows."""

    captions: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    splits: dict[str, str] = dataclasses.field(default_factory=dict)
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    source: str = ""


def normalise_path(path: str) -> str:
    """'./a//b.mp4' → 'a/b.mp4' (the key used to match caption rows to files)."""
    return os.path.normpath(path.strip()).replace(os.sep, "/") if path.strip() else ""


def clean_caption(text) -> str:
    """Collapses whitespace; returns '' for missing values."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return " ".join(str(text).split())


def _decode_lines(raw: bytes, counts: collections.Counter) -> list[str]:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = []
    for line in raw.splitlines(keepends=True):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("utf-8", "replace"))
            counts["non_utf8_caption"] += 1
    return lines


def find_caption_file(source_dir: str) -> str | None:
    for name in CAPTION_FILES:
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            return path
    return None


def read_captions(path: str) -> CaptionTable:
    """Reads a CSV or JSONL caption file. Bad rows are counted in ``counts`` (``bad_caption_row``), never raised."""
    table = CaptionTable(source=path)
    with open(path, "rb") as f:
        lines = _decode_lines(f.read(), table.counts)

    def add(p, c, split=None):
        p = normalise_path(str(p or ""))
        if not p:
            table.counts["bad_caption_row"] += 1
            return
        entry = table.captions.setdefault(p, [])
        c = clean_caption(c)
        if c:
            entry.append(c)
        if split:
            table.splits[p] = clean_caption(split).lower()

    if path.endswith((".jsonl", ".json")):
        text = "".join(lines).strip()
        if text.startswith("["):  # a JSON array of objects
            try:
                rows = json.loads(text)
            except json.JSONDecodeError:
                rows, table.counts["bad_caption_row"] = [], table.counts["bad_caption_row"] + 1
        else:
            rows = []
            for line in lines:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    table.counts["bad_caption_row"] += 1
        for row in rows:
            if isinstance(row, dict):
                add(row.get("path"), row.get("caption"), row.get("split"))
            else:
                table.counts["bad_caption_row"] += 1
        return table

    reader = csv.reader(io.StringIO("".join(lines)))
    header = next(reader, None)
    if header is None:
        return table
    cols = [h.strip().lower() for h in header]
    if "path" not in cols or "caption" not in cols:
        raise ValueError(f"{path}: the CSV header must name the columns 'path' and 'caption' (got {header}).")
    ip, ic = cols.index("path"), cols.index("caption")
    isplit = cols.index("split") if "split" in cols else None
    for row in reader:
        if not row or not any(x.strip() for x in row):
            continue
        if len(row) <= ip:
            table.counts["bad_caption_row"] += 1
            continue
        split = row[isplit] if isplit is not None and len(row) > isplit else None
        add(row[ip], row[ic] if len(row) > ic else "", split)
    return table


@lru_cache
def ucf101_class_names() -> tuple[str, ...]:
    """The 101 UCF101 class names in label order, from the file tensorflow-datasets ships."""
    import tensorflow_datasets as tfds

    path = os.path.join(os.path.dirname(tfds.__file__), "video", "ucf101_labels.txt")
    with open(path, encoding="utf-8") as f:
        names = tuple(x.strip() for x in f if x.strip())
    if len(names) != 101:
        raise ValueError(f"expected 101 UCF101 class names in {path}, found {len(names)}")
    return names


_UCF_FILE = re.compile(r"^v_([A-Za-z]+)_g\d+_c\d+", re.IGNORECASE)


def class_from_path(rel_path: str) -> str:
    """Class name of a video: UCF101's ``v_<Class>_gXX_cYY`` file name, else its parent folder's name."""
    m = _UCF_FILE.match(os.path.basename(rel_path))
    if m:
        return m.group(1)
    parent = os.path.basename(os.path.dirname(rel_path))
    return parent


def humanise_class(name: str) -> str:
    """'ApplyEyeMakeup' → 'apply eye makeup'; 'playing_guitar' → 'playing guitar'."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name.replace("_", " ").replace("-", " "))
    return " ".join(words.lower().split())


def class_lookup(names: tuple[str, ...]) -> dict[str, int]:
    """Case-insensitive name → label (UCF101's folders spell 'HandStandPushups', its label list 'HandstandPushups')."""
    return {n.lower(): i for i, n in enumerate(names)}
