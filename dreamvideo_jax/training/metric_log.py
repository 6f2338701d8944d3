"""Training metrics: accumulation between log steps, JSONL + TensorBoard writers, terminal progress bar.

`WORKDIR/metrics.jsonl` has one JSON object per log step: `{"step": N, "loss": ..., "loss/t_000-099": ..., ...}`.
TensorBoard event files go to `WORKDIR/tensorboard/`. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any

import jax
import numpy as np
from etils import epath

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients were not finite (train.nonfinite='stop')."""


class Accumulator:
    """Sums per-step metrics between log steps; `summary()` returns means plus per-timestep-bucket losses."""

    def __init__(self, num_buckets: int, num_train_timesteps: int):
        self.num_buckets, self.num_t = num_buckets, num_train_timesteps
        self.reset()

    def reset(self):
        self.n = 0
        self.sums: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.bucket_sum = np.zeros(self.num_buckets)
        self.bucket_count = np.zeros(self.num_buckets)
        self.skipped = 0

    def add(self, m: dict[str, Any]) -> None:
        self.n += 1
        for k in ("loss", "grad_norm", "update_norm", "text_dropped", "image_dropped"):
            self.sums[k] = self.sums.get(k, 0.0) + float(m[k])
        for k in ("param_norm", "learning_rate"):
            self.last[k] = float(m[k])
        self.bucket_sum += np.asarray(m["bucket_loss_sum"], np.float64)
        self.bucket_count += np.asarray(m["bucket_count"], np.float64)
        if not bool(m["finite"]):
            self.skipped += 1

    def summary(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        out.update(self.last)
        width = self.num_t // self.num_buckets
        for i in range(self.num_buckets):
            if self.bucket_count[i] > 0:
                lo, hi = i * width, (i + 1) * width - 1 if i < self.num_buckets - 1 else self.num_t - 1
                out[f"loss_by_t/{lo:03d}-{hi:03d}"] = float(self.bucket_sum[i] / self.bucket_count[i])
        if self.skipped:
            out["skipped_updates"] = float(self.skipped)
        return out


class MetricWriter:
    """JSONL + TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(workdir) / METRICS_FILE
        self._tb = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(epath.Path(workdir) / TB_DIR), flush_secs=30)
            except Exception as e:  # noqa: BLE001 - metrics must not kill training; JSONL still works
                log.warning("TensorBoard writer unavailable (%s); writing %s only", e, METRICS_FILE)

    def _truncate_after(self, step: int) -> None:
        """Drops lines of steps after `step` (written by a run that died before its next checkpoint)."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        if len(keep) != len(lines):
            self.path.write_text("".join(x + "\n" for x in keep))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
                    for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class Progress:
    """tqdm progress bar on process 0 (no-op elsewhere or when disabled)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=1.0)
        self._t = time.perf_counter()

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
