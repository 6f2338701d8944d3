"""tfds builder for a folder of videos plus captions (WebVid / MSR-VTT / UCF101 / your own clips).

The folder holds video files (any depth) and a caption file, ``captions.csv`` (header ``path,caption``, optional
``split`` column) or ``captions.jsonl`` (``{"path": ..., "caption": ...}`` per line). With
``caption_from="class"`` no caption file is needed: the class name (UCF101's ``v_<Class>_gXX_cYY`` file names
or the parent folder) becomes the caption, e.g. ``ApplyEyeMakeup`` → ``"apply eye makeup"``; with
``class_names="ucf101"`` the class must be one of the 101 UCF101 names (shipped with tensorflow-datasets) and
its index is stored as ``label``.

Videos are decoded at build time and stored as uint8 frames ``[T, height, width, 3]`` with ``min_frames <= T <=
max_frames``, after taking every ``frame_stride``-th frame (or resampling to ``fps``), resizing the short side
and centre-cropping. Long videos give up to ``clips_per_video`` consecutive records. Bad items are skipped and
counted (see :mod:`dreamvideo_jax.data.report`), never raised. Every path read stays inside the folder: caption
rows naming an absolute path or ``..``, and symlinks that resolve outside it, are skipped as ``outside_source_dir``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds

from dreamvideo_jax.data import captions as captions_lib
from dreamvideo_jax.data import video_io
from dreamvideo_jax.data.report import BuildReport
from dreamvideo_jax.data.tfds_base import ArrayRecordBuilder

CAPTION_FROM = ("file", "class", "file_or_class")


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
    """Build options (recorded in the dataset's ``dataset_info.json`` description)."""

    source_dir: str = ""
    max_frames: int = 32
    min_frames: int = 8
    frame_stride: int = 1
    fps: float = 0.0  # > 0: resample to this rate instead of frame_stride
    height: int = 256
    width: int = 256
    center_crop: bool = True
    clips_per_video: int = 1
    caption_from: str = "file"  # file | class | file_or_class
    class_names: str = ""  # '' (any class) | 'ucf101'
    class_caption_template: str = "{}"
    default_split: str = "train"  # split of videos whose caption row names none
    zlib: bool = False  # compress frames in the records (smaller files, slower reads)
    num_workers: int = 4  # parallel decoders

    def options(self) -> dict:
        base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(VideoFolderConfig) if f.name not in base}


def default_config_name(height: int, width: int, max_frames: int, frame_stride: int = 1, fps: float = 0.0) -> str:
    rate = f"fps{fps:g}" if fps > 0 else f"stride{frame_stride}"
    return f"{height}x{width}_{max_frames}f_{rate}".replace(".", "p")


def make_config(name: str = "", **options) -> VideoFolderConfig:
    """A config with validated options; ``name`` defaults to one derived from the resolution and sampling."""
    known = {f.name for f in dataclasses.fields(VideoFolderConfig)} - {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown video_folder options {sorted(unknown)}; known: {sorted(known)}")
    probe = VideoFolderConfig(name="probe", **options)
    if probe.caption_from not in CAPTION_FROM:
        raise ValueError(f"caption_from must be one of {CAPTION_FROM}, got {probe.caption_from!r}")
    if probe.class_names not in ("", "ucf101"):
        raise ValueError(f"class_names must be '' or 'ucf101', got {probe.class_names!r}")
    if not 1 <= probe.min_frames <= probe.max_frames:
        raise ValueError(f"need 1 <= min_frames ({probe.min_frames}) <= max_frames ({probe.max_frames})")
    if probe.height < 1 or probe.width < 1 or probe.frame_stride < 1 or probe.clips_per_video < 1:
        raise ValueError("height, width, frame_stride and clips_per_video must be >= 1")
    name = name or default_config_name(probe.height, probe.width, probe.max_frames, probe.frame_stride, probe.fps)
    desc = json.dumps({k: v for k, v in probe.options().items() if k not in ("source_dir", "num_workers")})
    return dataclasses.replace(probe, name=name, description=desc)


@dataclasses.dataclass
class _Item:
    rel_path: str
    captions: list[str]
    label: int
    split: str


def list_videos(source_dir: str) -> list[str]:
    """Relative paths (forward slashes, sorted) of the files with a video extension under ``source_dir``."""
    out = []
    for root, dirs, files in os.walk(source_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            if f.lower().endswith(video_io.VIDEO_EXTENSIONS) and not f.startswith("."):
                out.append(os.path.relpath(os.path.join(root, f), source_dir).replace(os.sep, "/"))
    return sorted(out)


def _outside_root(root: str, rel: str) -> str:
    """Why ``rel`` (a caption row's path or a file found on disk) leads out of the folder ``root`` (already
    resolved), or '' when it stays inside: absolute paths and ``..`` are refused, symlinks are resolved first."""
    if os.path.isabs(rel) or rel == ".." or rel.startswith("../"):
        return "absolute or '..' path leaves source_dir; paths must be relative to source_dir"
    real = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, real]) != root:
        return f"resolves to {real}, outside source_dir (a symlink leading out?); copy the video into source_dir"
    return ""


def plan_items(cfg: VideoFolderConfig, report: BuildReport) -> dict[str, list[_Item]]:
    """Matches videos to captions; returns items per split and counts the unusable ones in ``report``."""
    src = cfg.source_dir
    if not src or not os.path.isdir(src):
        raise FileNotFoundError(f"source_dir {src!r} is not a folder")
    cap_path = captions_lib.find_caption_file(src)
    if cap_path is None and cfg.caption_from == "file":
        raise FileNotFoundError(
            f"no caption file in {src} (expected one of {captions_lib.CAPTION_FILES}); "
            "use caption_from='class' for class-labelled folders such as UCF101."
        )
    table = captions_lib.read_captions(cap_path) if cap_path else captions_lib.CaptionTable()
    for reason, n in table.counts.items():
        if reason == "non_utf8_caption":
            report.convert(reason, n)
        else:
            report.skip(reason, cap_path or "", "", n)
    names = captions_lib.ucf101_class_names() if cfg.class_names == "ucf101" else None
    lookup = captions_lib.class_lookup(names) if names else {}
    on_disk = list_videos(src)
    # Listed paths first (in file order), then unlisted videos on disk.
    paths = list(table.captions) + [p for p in on_disk if p not in table.captions]
    items: dict[str, list[_Item]] = collections.defaultdict(list)
    root = os.path.realpath(src)
    for rel in paths:
        outside = _outside_root(root, rel)
        if outside:
            report.skip("outside_source_dir", rel, outside)
            continue
        full = os.path.join(src, rel)
        if not os.path.isfile(full):
            report.skip("missing_file", rel, "listed in the caption file, not found")
            continue
        caps = list(table.captions.get(rel, []))
        label = -1
        if cfg.caption_from != "file" and (cfg.caption_from == "class" or not caps):
            cls = captions_lib.class_from_path(rel)
            if lookup:
                if cls.lower() not in lookup:
                    report.skip("unknown_class", rel, f"class {cls!r} is not a UCF101 class")
                    continue
                label = lookup[cls.lower()]
                cls = names[label]
            if not cls:
                report.skip("missing_caption", rel, "no caption and no class folder")
                continue
            caps = [cfg.class_caption_template.format(captions_lib.humanise_class(cls))]
        if not caps:
            report.skip("missing_caption", rel, "no caption for this video")
            continue
        items[table.splits.get(rel) or cfg.default_split].append(_Item(rel, caps, label, ""))
    return dict(items)


class VideoFolder(ArrayRecordBuilder):
    """Videos + captions from a local folder, decoded into uint8 frames (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    # No registered config: every build passes its own (with its source_dir). A registered one would make tfds
    # refuse any config of the same name that is not that very object, i.e. every build at the default size.
    BUILDER_CONFIGS: list = []
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the video folder as the config's source_dir (or --source_dir)."

    def __init__(self, *args, report: BuildReport | None = None, exclude_splits=(), **kwargs):
        self.report = report or BuildReport()
        self.exclude_splits = set(exclude_splits)
        self.empty_splits: set[str] = set()
        self.planned_splits: set[str] = set()
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        f = tfds.features
        video = f.Tensor(
            shape=(None, c.height, c.width, 3),
            dtype=np.uint8,
            encoding=f.Encoding.ZLIB if c.zlib else f.Encoding.BYTES,
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=f.FeaturesDict(
                {
                    "video": video,
                    "caption": f.Text(doc="first caption of the video"),
                    "captions": f.Text(doc="all captions of the video, joined with newlines"),
                    "path": f.Text(doc="path relative to the source folder"),
                    "label": f.Scalar(dtype=np.int32, doc="class index (class_names='ucf101'), else -1"),
                    "clip_index": f.Scalar(dtype=np.int32, doc="segment of the video (clips_per_video > 1)"),
                    "fps": f.Scalar(dtype=np.float32, doc="frame rate of the stored frames"),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        items = plan_items(self.builder_config, self.report)
        self.planned_splits = set(items)
        return {s: self._generate_examples(s, v) for s, v in sorted(items.items()) if s not in self.exclude_splits}

    def _decode(self, item: _Item) -> tuple[_Item, video_io.DecodeResult]:
        c = self.builder_config
        try:
            res = video_io.read_video(
                os.path.join(c.source_dir, item.rel_path),
                max_frames=c.max_frames * c.clips_per_video,
                frame_stride=c.frame_stride,
                fps=c.fps,
                height=c.height,
                width=c.width,
                center_crop=c.center_crop,
            )
        except Exception as e:  # noqa: BLE001 - read_video should not raise; never let one file stop a build
            res = video_io.DecodeResult(None, error="error", message=f"{type(e).__name__}: {e}")
        return item, res

    def _decoded(self, items):
        """Decodes in a thread pool (ffmpeg releases the GIL), in order, with a bounded number in flight."""
        workers = max(1, self.builder_config.num_workers)
        if workers == 1:
            yield from map(self._decode, items)
            return
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            pending = collections.deque()
            for item in items:
                pending.append(pool.submit(self._decode, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _generate_examples(self, split: str, items: list[_Item]):
        c = self.builder_config
        n = 0
        for item, res in self._decoded(items):
            if res.error:
                self.report.skip(res.error, item.rel_path, res.message, split=split)
                continue
            frames = res.frames
            if len(frames) < c.min_frames:
                self.report.skip("too_few_frames", item.rel_path, f"{len(frames)} < min_frames={c.min_frames}", split=split)
                continue
            for note in res.notes:
                self.report.convert(note)
            if res.source_size[0] < c.height or res.source_size[1] < c.width:
                self.report.convert("upscaled")
            for k in range(c.clips_per_video):
                clip = frames[k * c.max_frames : (k + 1) * c.max_frames]
                if len(clip) < c.min_frames:
                    break
                self.report.write(split)
                n += 1
                yield f"{item.rel_path}#{k}", {
                    "video": clip,
                    "caption": item.captions[0],
                    "captions": "\n".join(item.captions),
                    "path": item.rel_path,
                    "label": np.int32(item.label),
                    "clip_index": np.int32(k),
                    "fps": np.float32(res.fps),
                }
        if n == 0:
            self.empty_splits.add(split)
