"""grain input pipeline over the tfds array_record datasets: deterministic, per-process, checkpointable.

Training batches are dicts of numpy arrays, ``B_local = batch_size // process_count`` examples each:

  video   float32 [B, F, H, W, 3] in [-1, 1]  (uint8 in [0, 255] with ``data.as_uint8``)
  image   float32 [B, H, W, 3]    = video[:, 0], the reference image (same dtype as video)
  tokens  int32   [B, max_length] CLIP ids (see :mod:`dreamvideo_jax.data.tokenizer` for the pad id)
  index   int64   [B]             record index in the split (debugging, provenance)
  caption bytes   [B]             only with ``with_captions=True``

The order is a pure function of (seed, process_index, process_count): each process reads the records
``process_index::process_count`` of the split, globally shuffled per epoch (index permutation, no shuffle
buffer), with a random clip window per example drawn from a per-example seed. Results do not depend on the
number of threads or worker processes. The returned iterator is a ``grain.DatasetIterator``:
``get_state()`` / ``set_state()`` round-trip exactly, and ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore`` store it with orbax.

Records that cannot be read or converted are skipped with a warning; clips shorter than
``(num_frames - 1) * frame_stride + 1`` use a smaller stride, then repeat their last frame. A training pipeline
whose records keep failing stops instead of skipping forever: after ``data.max_bad_records`` unusable records in a
row (or twice the split's length, when that is smaller: a whole epoch without one usable record), ``next()``
raises :class:`dreamvideo_jax.errors.DataError` naming the dataset and split.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import threading
from typing import Any

import grain
import numpy as np

from dreamvideo_jax.data import build as build_lib
from dreamvideo_jax.data import tokenizer as tokenizer_lib
from dreamvideo_jax.data import video_io
from dreamvideo_jax.errors import DataError, one_line

log = logging.getLogger(__name__)

_stats = collections.Counter()  # per process: problems met while reading (see `pipeline_stats`)
_stats_lock = threading.Lock()


def pipeline_stats() -> dict[str, int]:
    """Counts of skipped / repaired records in this process (worker processes keep their own)."""
    with _stats_lock:
        return dict(_stats)


def _count(key: str, message: str = "") -> None:
    with _stats_lock:
        _stats[key] += 1
        n = _stats[key]
    if message and (n <= 3 or n in (10, 100, 1000) or n % 10000 == 0):
        log.warning("%s (%d so far): %s", key, n, message)


# ----------------------------------------------------------------------------------------------------------------
# Locating and opening datasets


def resolve_data_dir(data_cfg) -> str:
    return data_cfg.get("data_dir") or build_lib.default_data_dir()


def _moving_shapes_options(data_cfg) -> dict:
    return {k: int(v) for k, v in data_cfg.build.items()}


def find_dataset_dir(data_dir: str, dataset: str, config_name: str = "") -> str:
    """The version folder of a built dataset: ``data_dir/dataset/config_name/<latest version>``.

    With an empty ``config_name`` the only build present is used. Raises FileNotFoundError listing what exists.
    """
    from etils import epath

    root = epath.Path(data_dir) / dataset
    if not config_name:
        configs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.exists() else []
        configs = [c for c in configs if _versions(root / c)]
        if len(configs) != 1:
            found = f"builds found: {configs}" if configs else "nothing is built there"
            raise FileNotFoundError(
                f"set data.config_name to choose a build of {dataset!r} in {data_dir} ({found}). Build one with "
                f"`python -m dreamvideo_jax.data.build --dataset={dataset} --data_dir={data_dir} ...`."
            )
        config_name = configs[0]
    versions = _versions(root / config_name)
    if not versions:
        raise FileNotFoundError(
            f"dataset {dataset}/{config_name} not found in {data_dir}. Build it with "
            f"`python -m dreamvideo_jax.data.build --dataset={dataset} --data_dir={data_dir} ...`."
        )
    return os.fspath(root / config_name / versions[-1])


def _versions(path) -> list[str]:
    if not path.exists():
        return []
    vs = [p.name for p in path.iterdir() if (p / "dataset_info.json").exists()]
    return sorted(vs, key=lambda v: tuple(int(x) if x.isdigit() else 0 for x in v.split(".")))


def dataset_path(data_cfg) -> str:
    """Version folder of the configured dataset, building moving_shapes first when allowed and missing."""
    data_dir = resolve_data_dir(data_cfg)
    if data_cfg.dataset == "moving_shapes":
        opts = _moving_shapes_options(data_cfg)
        name = data_cfg.get("config_name") or build_lib.ms_lib.config_name(**opts)
        if data_cfg.get("auto_build", True):
            path = build_lib.dataset_dir(data_dir, "moving_shapes", name)
            from etils import epath

            if not epath.Path(path, "dataset_info.json").exists():
                log.info("building moving_shapes/%s into %s", name, data_dir)
                build_lib.ensure_moving_shapes(data_dir, config_name=name, **opts)
        return find_dataset_dir(data_dir, "moving_shapes", name)
    return find_dataset_dir(data_dir, data_cfg.dataset, data_cfg.get("config_name", ""))


def open_source(data_cfg, split: str | None = None):
    """Random-access source (``len``, ``[i]`` → dict of numpy / bytes) of a split, via tfds without TensorFlow."""
    return _open_source(data_cfg, split)[0]


def _open_source(data_cfg, split: str | None = None):
    """(source, version folder) of a split."""
    import tensorflow_datasets as tfds

    path = dataset_path(data_cfg)
    builder = tfds.builder_from_directory(path)
    split = split or data_cfg.split
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {path} (splits: {sorted(builder.info.splits)})")
    return builder.as_data_source(split), path


class BadRecordGuard:
    """Counts unusable records in a row and raises :class:`DataError` at ``limit`` (0: never).

    Shared by the reading and the transforming step of one pipeline (a record can fail in either); a usable
    record resets the count. Picklable: each grain worker process counts its own records.
    """

    def __init__(self, limit: int, where: str):
        self.limit, self.where = int(limit), where
        self._run = 0
        self._lock = threading.Lock()

    def __getstate__(self):
        d = dict(self.__dict__)
        d.pop("_lock")
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def ok(self) -> None:
        with self._lock:
            self._run = 0

    def bad(self, reason: str) -> None:
        with self._lock:
            self._run += 1
            n = self._run
        if self.limit > 0 and n >= self.limit:
            raise DataError(
                f"{self.where}: {self.limit} records in a row could not be read or used, none usable in between "
                f"(last: {' '.join(reason.split())[:300]}); the dataset looks corrupt: rebuild it with "
                "`python -m dreamvideo_jax.data.build ... --overwrite`, or raise data.max_bad_records"
            )


class _SafeSource:
    """Wraps a data source so a record that fails to read becomes None (skipped) instead of an exception."""

    def __init__(self, source, guard: BadRecordGuard | None = None):
        self._source = source
        self._guard = guard

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        index = int(index)
        try:
            rec = dict(self._source[index])
        except Exception as e:  # noqa: BLE001 - a corrupt record must not stop training
            msg = f"record {index}: {one_line(e)}"
            _count("unreadable_record", msg)
            if self._guard is not None:
                self._guard.bad(f"unreadable {msg}")
            return None
        rec["_index"] = index
        return rec


# ----------------------------------------------------------------------------------------------------------------
# Per-example transform


def _as_text(x) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if isinstance(x, np.ndarray):
        return _as_text(x.item()) if x.size == 1 else ""
    return "" if x is None else str(x)


def _as_video(x) -> np.ndarray:
    """uint8 [T, H, W, 3] from whatever a record holds (grayscale / RGBA / one frame are converted)."""
    v = np.asarray(x)
    if v.ndim == 2:
        v = v[None, ..., None]
    elif v.ndim == 3:
        v = v[None] if v.shape[-1] in (1, 2, 3, 4) and v.shape[-1] < v.shape[0] else v[..., None]
    if v.ndim != 4 or v.shape[0] == 0 or min(v.shape[1:3]) == 0:
        raise ValueError(f"not a video: shape {v.shape}")
    if v.shape[-1] != 3 or v.dtype != np.uint8:
        v = np.stack([video_io.to_rgb(f)[0] for f in v])
    return v


def fit_stride(num_available: int, num_frames: int, stride: int) -> int:
    """The stride a clip window uses: ``stride``, shrunk until ``num_frames`` fit in ``num_available`` (or 1)."""
    stride = max(1, stride)
    while stride > 1 and (num_frames - 1) * stride + 1 > num_available:
        stride -= 1
    return stride


def frame_indices(num_available: int, num_frames: int, stride: int, start: int | None) -> np.ndarray:
    """Indices of a clip window; shrinks the stride for short videos, then repeats the last frame."""
    stride = fit_stride(num_available, num_frames, stride)
    span = (num_frames - 1) * stride + 1
    start = 0 if start is None else int(np.clip(start, 0, max(0, num_available - span)))
    return np.minimum(start + np.arange(num_frames) * stride, num_available - 1)


def _resize_clip(frames: np.ndarray, height: int, width: int, rng: np.random.Generator | None) -> np.ndarray:
    h, w = frames.shape[1:3]
    if (h, w) == (height, width):
        return frames
    if rng is None:
        return np.stack([video_io.resize_frame(f, height, width, center_crop=True) for f in frames])
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    top, left = int(rng.integers(0, nh - height + 1)), int(rng.integers(0, nw - width + 1))
    out = []
    for f in frames:
        g = video_io.resize_frame(f, nh, nw, center_crop=False)
        out.append(g[top : top + height, left : left + width])
    return np.stack(out)


@dataclasses.dataclass
class ClipTransform:
    """Record → model example. Picklable (runs in grain worker processes)."""

    num_frames: int
    frame_stride: int
    height: int
    width: int
    tokenizer: Any
    max_length: int = 77
    pad_id: int = tokenizer_lib.PAD_ID
    train: bool = True
    random_crop: bool = False
    random_caption: bool = True
    with_captions: bool = False
    with_metadata: bool = False
    with_frame_info: bool = False  # add source_frames / padded_frames / stride_used (evaluation protocols)
    guard: BadRecordGuard | None = None  # training: stops a pipeline whose records keep failing

    def __post_init__(self):
        self._cache: dict[str, np.ndarray] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_cache"] = {}
        return d

    def tokens(self, caption: str) -> np.ndarray:
        ids = self._cache.get(caption)
        if ids is None:
            ids = tokenizer_lib.tokenize(self.tokenizer, [caption], self.max_length, self.pad_id)[0]
            if ids[-1] == tokenizer_lib.EOS_ID and ids[-2] != self.pad_id:
                _count("caption_truncated", f"caption longer than {self.max_length} tokens: {caption[:80]!r}")
            if len(self._cache) < 100_000:
                self._cache[caption] = ids
        return ids

    def __call__(self, record, rng: np.random.Generator | None = None):
        if record is None:
            return None
        try:
            out = self._apply(record, rng)
        except Exception as e:  # noqa: BLE001 - a bad record must not stop training
            msg = f"record {record.get('_index')}: {one_line(e)}"
            _count("bad_record", msg)
            if self.guard is not None:
                self.guard.bad(f"unusable {msg}")
            return None
        if self.guard is not None:
            self.guard.ok()
        return out

    def _apply(self, record, rng):
        video = _as_video(record["video"])
        t = len(video)
        span = (self.num_frames - 1) * self.frame_stride + 1
        start = int(rng.integers(0, max(0, t - span) + 1)) if (self.train and rng is not None) else 0
        idx = frame_indices(t, self.num_frames, self.frame_stride, start)
        if t < span:
            _count("short_clip", f"record {record.get('_index')}: {t} frames < {span} needed")
        clip = _resize_clip(video[idx], self.height, self.width, rng if (self.train and self.random_crop) else None)
        clip = np.ascontiguousarray(clip)  # uint8; converted to float once per batch (see `normalise_batch`)
        caption = _as_text(record.get("caption", ""))
        if self.train and self.random_caption and rng is not None and "captions" in record:
            options = [c for c in _as_text(record["captions"]).split("\n") if c]
            if len(options) > 1:
                caption = options[int(rng.integers(len(options)))]
        out = {
            "video": clip,
            "tokens": self.tokens(caption),
            "index": np.int64(record.get("_index", -1)),
        }
        if self.with_captions:
            out["caption"] = caption.encode("utf-8")
        if self.with_frame_info:
            out["source_frames"] = np.int32(t)  # frames the record holds
            out["padded_frames"] = np.int32(max(0, self.num_frames - t))  # copies of the last frame appended
            out["stride_used"] = np.int32(fit_stride(t, self.num_frames, self.frame_stride))
        if self.with_metadata:
            for k, v in record.items():
                if k in ("video", "captions", "_index", "caption") or k in out:
                    continue
                if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == t:  # per-frame (e.g. centroids)
                    v = v[idx]
                out[k] = v.encode("utf-8") if isinstance(v, str) else v
            out["frame_indices"] = idx.astype(np.int32)
        return out


def normalise_batch(batch: dict, as_uint8: bool = False) -> dict:
    """Adds ``image`` (= frame 0) and maps uint8 ``video`` to float32 in [-1, 1] in one pass over the batch.

    With ``as_uint8`` the frames stay uint8 in [0, 255] (4x less host memory and host→device transfer; the
    model then applies ``x / 127.5 - 1`` on device).
    """
    video = batch["video"]
    if not as_uint8:
        out = np.empty(video.shape, np.float32)
        np.multiply(video, np.float32(2.0 / 255.0), out=out, dtype=np.float32)
        out -= np.float32(1.0)
        video = out
    batch["video"] = video
    batch["image"] = np.ascontiguousarray(video[:, 0])
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Iterators


def _local_batch(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by process_count {process_count}")
    return batch_size // process_count


def _transform(data_cfg, tokenizer, train: bool, with_captions: bool, with_metadata: bool,
               with_frame_info: bool = False) -> ClipTransform:
    if tokenizer is None:
        tokenizer = tokenizer_lib.clip_tokenizer()
    return ClipTransform(
        num_frames=int(data_cfg.num_frames),
        frame_stride=int(data_cfg.get("frame_stride", 1)),
        height=int(data_cfg.height),
        width=int(data_cfg.width),
        tokenizer=tokenizer,
        max_length=int(data_cfg.get("max_length", 77)),
        pad_id=int(data_cfg.get("pad_id", tokenizer_lib.PAD_ID)),
        train=train,
        random_crop=bool(data_cfg.get("random_crop", False)),
        random_caption=bool(data_cfg.get("random_caption", True)),
        with_captions=with_captions,
        with_metadata=with_metadata,
        with_frame_info=with_frame_info,
    )


def _finish(ds: grain.IterDataset, workers: int, prefetch: int) -> grain.DatasetIterator:
    prefetch = max(1, prefetch)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags in workers; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
    else:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return iter(ds)


def make_train_dataset(
    data_cfg,
    *,
    batch_size: int,
    seed: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer=None,
    with_captions: bool = False,
    source=None,
) -> grain.IterDataset:
    """The training pipeline as a ``grain.IterDataset`` (see :func:`make_train_iterator`)."""
    local = _local_batch(batch_size, process_count)
    seed = int(data_cfg.get("seed", 0) if seed is None else seed)
    if source is None:
        source, where = _open_source(data_cfg, data_cfg.split)
        where = f"{where} split {data_cfg.split!r}"
    else:
        where = f"split {data_cfg.split!r} of the given {type(source).__name__}"
    if len(source) == 0:
        raise ValueError(f"split {data_cfg.split!r} of {data_cfg.dataset!r} is empty")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    shard = len(range(process_index, len(source), process_count))
    if shard == 0:
        raise ValueError(f"process {process_index} of {process_count} has no records ({len(source)} in the split)")
    # A whole epoch (any 2 * shard draws in a row contain one) plus the reads in flight, capped by the config.
    limit = int(data_cfg.get("max_bad_records", 1000))
    guard = BadRecordGuard(min(limit, 2 * shard + 2 * local) if limit > 0 else 0, where)
    ds = grain.MapDataset.source(_SafeSource(source, guard))
    ds = ds[process_index::process_count]  # disjoint shards that together cover the split
    if data_cfg.get("shuffle", True):
        ds = ds.shuffle(seed=seed * 1_000_003 + process_index)
    epochs = int(data_cfg.get("num_epochs", -1))
    ds = ds.repeat(None if epochs < 0 else epochs)
    transform = dataclasses.replace(_transform(data_cfg, tokenizer, True, with_captions, False), guard=guard)
    ds = ds.random_map(transform, seed=seed + 7919 * process_index + 1)
    read = grain.ReadOptions(num_threads=max(1, int(data_cfg.get("read_threads", 2))), prefetch_buffer_size=2 * local)
    ds = ds.to_iter_dataset(read).batch(local, drop_remainder=True)
    return ds.map(functools.partial(normalise_batch, as_uint8=bool(data_cfg.get("as_uint8", False))))


def make_train_iterator(
    data_cfg,
    *,
    batch_size: int,
    seed: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer=None,
    with_captions: bool = False,
    source=None,
) -> grain.DatasetIterator:
    """Infinite (or ``num_epochs``) iterator of training batches for this process.

    Args:
      data_cfg: the ``config.data`` section (:func:`dreamvideo_jax.data.config.defaults`).
      batch_size: global batch size; each process yields ``batch_size // process_count`` examples.
      seed: shuffling / clip-window seed (default ``data_cfg.seed``).
      process_index, process_count: this process's shard (``jax.process_index()``, ``jax.process_count()``).
      tokenizer: a CLIP tokenizer; default :func:`dreamvideo_jax.data.tokenizer.clip_tokenizer`.
      with_captions: add the caption strings (bytes) under ``caption``.
      source: an explicit random-access source (tests, custom data); default the configured tfds split.

    Returns:
      A ``grain.DatasetIterator`` of batches (see the module docstring); ``get_state()``/``set_state()``
      checkpoint it exactly. Call ``close()`` when done to stop its prefetch threads / workers.
    """
    ds = make_train_dataset(
        data_cfg,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        tokenizer=tokenizer,
        with_captions=with_captions,
        source=source,
    )
    return _finish(ds, int(data_cfg.get("worker_count", 0)), int(data_cfg.get("prefetch", 2)))


def eval_indices(num_records: int, process_index: int, process_count: int, local_batch: int) -> np.ndarray:
    """This process's record indices for one evaluation pass, padded with -1 so every process runs the same
    number of full batches (the padded examples have ``mask == False``)."""
    per_process = math.ceil(num_records / process_count)
    batches = max(1, math.ceil(per_process / local_batch))
    idx = np.arange(process_index, num_records, process_count)
    return np.concatenate([idx, -np.ones(batches * local_batch - len(idx), np.int64)])


def make_eval_iterator(
    data_cfg,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer=None,
    split: str | None = None,
    num_examples: int | None = None,
    with_captions: bool = True,
    with_metadata: bool = True,
    with_frame_info: bool = False,
    source=None,
) -> grain.DatasetIterator:
    """One deterministic pass over an evaluation split.

    Clips start at frame 0 (no randomness, centre crop); records are split round-robin over processes and the
    last batches are padded so every process yields the same number of batches. Each batch has ``mask`` (bool
    [B]) marking real examples, plus ``caption`` and the record's metadata (``label``; for moving_shapes
    ``motion``, ``shape``, ``colour``, ``centroids`` of the selected frames, ...) when requested. With
    ``with_frame_info``, ``source_frames`` (frames the record holds), ``padded_frames`` (copies of its last frame
    appended because it is shorter than ``num_frames``) and ``stride_used`` (the frame stride, shrunk for short
    records), int32 [B] each.
    """
    local = _local_batch(batch_size, process_count)
    split = split or data_cfg.get("eval_split", "validation")
    source = source if source is not None else open_source(data_cfg, split)
    n = len(source) if num_examples is None else min(len(source), int(num_examples))
    idx = eval_indices(n, process_index, process_count, local)
    safe = _SafeSource(source)
    transform = _transform(data_cfg, tokenizer, False, with_captions, with_metadata, with_frame_info)
    template: dict = {}

    def read(i):
        i = int(idx[i])
        ex = transform(safe[max(i, 0)])
        if ex is None:  # unreadable record: keep the slot (static shapes), mask it out
            ex = None if not template else {k: np.zeros_like(v) for k, v in template.items()}
            i = -1
        if ex is None:
            raise RuntimeError("the first evaluation record could not be read")
        if not template:
            template.update(ex)
        ex["mask"] = np.bool_(i >= 0)
        return ex

    ds = grain.MapDataset.range(len(idx)).map(read)
    read_opts = grain.ReadOptions(num_threads=max(1, int(data_cfg.get("read_threads", 2))), prefetch_buffer_size=2 * local)
    ds = ds.to_iter_dataset(read_opts).batch(local, drop_remainder=True)
    ds = ds.map(functools.partial(normalise_batch, as_uint8=bool(data_cfg.get("as_uint8", False))))
    return _finish(ds, 0, int(data_cfg.get("prefetch", 2)))  # threads: `read` keeps state
