"""Writing sampled videos: .mp4 (H.264), .gif, .npz, and a PNG contact sheet.

* ``.mp4``: libx264, ``yuv420p`` (plays everywhere: browsers, QuickTime, phones), CRF 18, ``+faststart``.
  ``yuv420p`` needs even sizes; model sizes are multiples of the autoencoder factor (always even), and any odd
  size is padded by one edge-copied row/column (logged) rather than encoded in a format players refuse.
* ``.gif``: one global palette computed from all frames (ffmpeg ``palettegen`` / ``paletteuse`` with ordered
  dithering, which does not flicker between frames), looping. Unlike Pillow's writer, identical consecutive
  frames are kept, so a GIF always has exactly the video's frame count.
* ``.npz``: ``video`` uint8 ``(F, H, W, 3)`` plus whatever else is passed (latents, reference images, prompts).
* ``.json``: :func:`write_json` (metrics and results files of the demo, the evaluation and the benchmarks).

Both video formats go through the ffmpeg executable shipped with ``imageio-ffmpeg`` (no system ffmpeg needed).
Files are written to a temporary name in the target folder and renamed, so an interrupted run never leaves a
truncated video under the requested name.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

GIF_FILTER = "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=bayer:bayer_scale=4"


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
        raise ValueError(f"expected a uint8 video (F, H, W, 3), got {video.dtype} {video.shape}")
    return np.ascontiguousarray(video)


def _atomic(path: str):
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=ext, dir=folder)
    os.close(fd)
    return tmp


def _publish(tmp: str, path: str) -> None:
    """Renames the finished temporary file into place with the usual permissions (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _run_ffmpeg(video: np.ndarray, fps: float, args: Sequence[str], path: str) -> None:
    f, h, w, _ = video.shape
    tmp = _atomic(path)
    cmd = [_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-framerate", f"{float(fps):g}", "-i", "-", *args, tmp]
    try:
        # close_fds=False lets Python spawn ffmpeg with posix_spawn instead of fork() (our fds are
        # non-inheritable anyway), so a multithreaded JAX process is never forked.
        proc = subprocess.run(cmd, input=video.tobytes(), capture_output=True, close_fds=False)
        if proc.returncode != 0:
            msg = " ".join(proc.stderr.decode(errors="replace").split())[-500:]
            raise RuntimeError(f"ffmpeg failed writing {path}: {msg}")
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_mp4(path: str, video: np.ndarray, fps: float = 8.0, crf: int = 18) -> str:
    video = _check_video(video)
    _, h, w, _ = video.shape
    if h % 2 or w % 2:
        log.warning("%s: %dx%d is odd; padding to %dx%d (edge copy) for yuv420p H.264", path, w, h, w + w % 2,
                    h + h % 2)
        video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    _run_ffmpeg(video, fps, ["-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(int(crf)),
                             "-movflags", "+faststart"], path)
    return path


def write_gif(path: str, video: np.ndarray, fps: float = 8.0) -> str:
    video = _check_video(video)
    _run_ffmpeg(video, fps, ["-vf", GIF_FILTER, "-loop", "0"], path)
    return path


def write_npz(path: str, video: np.ndarray, **extra: Any) -> str:
    video = _check_video(video)
    tmp = _atomic(path)
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, video=video, **{k: np.asarray(v) for k, v in extra.items() if v is not None})
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_latents(path: str, latents: np.ndarray, **extra: Any) -> str:
    """Latents ``(S, F, h, w, C)`` (one entry per stage sampled so far) and metadata as an .npz."""
    tmp = _atomic(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, latents=np.asarray(latents, np.float32), **{k: np.asarray(v) for k, v in extra.items()})
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_video(path: str, video: np.ndarray, fps: float = 8.0, **npz_extra: Any) -> str:
    """Writes a uint8 ``(F, H, W, 3)`` video by extension (.mp4, .gif, .npz); ``npz_extra`` go into an .npz."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".mp4":
        return write_mp4(path, video, fps)
    if ext == ".gif":
        return write_gif(path, video, fps)
    if ext == ".npz":
        return write_npz(path, video, fps=np.float32(fps), **npz_extra)
    raise ValueError(f"unsupported video format {ext!r} for {path}; use .mp4, .gif or .npz")


def _label_column(labels: Sequence[str], row_h: int, gap: int, background: int, max_width: int) -> np.ndarray:
    """A column of one-line labels, one per row of height ``row_h``, text vertically centred in its row."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textbbox((0, 0), t, font=font)[2] for t in labels]
    width = min(max(widths, default=0) + 2 * LABEL_PAD, max_width)
    col = Image.new("RGB", (width, len(labels) * (row_h + gap) - gap), (background,) * 3)
    draw = ImageDraw.Draw(col)
    for i, text in enumerate(labels):
        while text and draw.textbbox((0, 0), text, font=font)[2] > width - 2 * LABEL_PAD:
            text = text[:-2] + "…"  # too long: shortened, ending in an ellipsis
        top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
        y = i * (row_h + gap) + (row_h - (bottom - top)) // 2 - top
        draw.text((LABEL_PAD, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(col)


# Space around the labels of a contact sheet's rows, and the widest label column (pixels).
LABEL_PAD, LABEL_MAX_WIDTH = 4, 480


def contact_sheet(rows: Sequence[np.ndarray], gap: int = 2, background: int = 255,
                  labels: Sequence[str] | None = None) -> np.ndarray:
    """A grid image: one row per video (stage or prompt), its frames left to right, ``gap`` pixels apart.

    Rows may have different frame counts (shorter rows are left blank at the end); all frames share H and W.
    ``labels`` (one per row) are written in a column on the left, so every row says what it is.
    """
    rows = [_check_video(r) for r in rows]
    h, w = rows[0].shape[1:3]
    if any(r.shape[1:3] != (h, w) for r in rows):
        raise ValueError("contact_sheet: all frames must have the same size")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"contact_sheet: {len(labels)} labels for {len(rows)} rows")
    cols = max(r.shape[0] for r in rows)
    sheet = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), background, np.uint8)
    for i, r in enumerate(rows):
        for j, frame in enumerate(r):
            y, x = i * (h + gap), j * (w + gap)
            sheet[y : y + h, x : x + w] = frame
    if labels is not None:
        column = _label_column(list(labels), h, gap, background, LABEL_MAX_WIDTH)
        sheet = np.concatenate([column, np.full((sheet.shape[0], gap, 3), background, np.uint8), sheet], axis=1)
    return sheet


def write_contact_sheet(path: str, rows: Sequence[np.ndarray], gap: int = 2,
                        labels: Sequence[str] | None = None) -> str:
    tmp = _atomic(path)
    try:
        Image.fromarray(contact_sheet(rows, gap, labels=labels)).save(tmp, format="PNG")
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str, obj: Any, sort_keys: bool = False) -> str:
    """Writes `obj` as indented JSON; a reader (or a killed run) never sees half a file."""
    tmp = _atomic(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
        _publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
