"""Counts of what a dataset build wrote, skipped (by reason) and converted, and the summary line it prints."""

from __future__ import annotations

import collections
import dataclasses
import json
import threading

# Why a record was not written.
SKIP_REASONS = {
    "missing_file": "listed in the caption file but not found",
    "outside_source_dir": "path leads out of source_dir (absolute, '..' or a symlink to elsewhere); not read",
    "missing_caption": "no caption (or an empty one)",
    "unknown_class": "class name not in the class list",
    "empty_file": "zero-byte file",
    "unreadable": "not a decodable video (corrupt, truncated, not a video)",
    "no_frames": "opened but no frame decoded",
    "too_few_frames": "fewer frames than min_frames",
    "bad_caption_row": "malformed row in the caption file",
    "error": "unexpected error while processing",
}
# What was repaired in a written record.
CONVERSIONS = {
    "grayscale": "grayscale video converted to RGB",
    "alpha": "alpha channel dropped",
    "partial_decode": "decoding stopped early; the decoded frames were kept",
    "non_utf8_caption": "caption line not valid UTF-8; decoded with replacement characters",
    "upscaled": "video smaller than the target resolution, upscaled",
}


@dataclasses.dataclass
class BuildReport:
    """Thread-safe counters filled while a builder generates examples."""

    written: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # per split
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # per reason
    converted: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # per conversion
    skipped_by_split: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # (split, reason)
    examples: list = dataclasses.field(default_factory=list)  # first few skipped items: (path, reason, message)
    max_examples: int = 50
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def skip(self, reason: str, path: str = "", message: str = "", n: int = 1, split: str | None = None) -> None:
        with self._lock:
            self.skipped[reason] += n
            if split is not None:
                self.skipped_by_split[(split, reason)] += n
            if len(self.examples) < self.max_examples:
                self.examples.append({"path": path, "reason": reason, "message": message[:300]})

    def convert(self, note: str, n: int = 1) -> None:
        with self._lock:
            self.converted[note] += n

    def write(self, split: str, n: int = 1) -> None:
        with self._lock:
            self.written[split] += n

    @property
    def num_written(self) -> int:
        return sum(self.written.values())

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "written": dict(self.written),
            "num_written": self.num_written,
            "skipped": dict(self.skipped),
            "num_skipped": self.num_skipped,
            "converted": dict(self.converted),
            "skipped_examples": list(self.examples),
        }

    def summary_line(self, dataset: str, config: str, path: str) -> str:
        def fmt(c):
            return " ".join(f"{k}={v}" for k, v in sorted(c.items())) or "-"

        return (
            f"SUMMARY dataset={dataset} config={config} written={self.num_written} skipped={self.num_skipped} "
            f"| written: {fmt(self.written)} | skipped: {fmt(self.skipped)} | converted: {fmt(self.converted)} "
            f"| dir={path}"
        )

    def save(self, path: str, extra: dict | None = None) -> None:
        from etils import epath

        data = dict(extra or {}, **self.to_dict())
        epath.Path(path).write_text(json.dumps(data, indent=2, sort_keys=True))
