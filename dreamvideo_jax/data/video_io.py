"""Video and image I/O: robust decoding (PyAV, imageio fallback), frame sampling, resize + crop, writing.

Decoding never raises for a bad file: :func:`read_video` returns a :class:`DecodeResult` whose ``error`` names
the problem (``empty_file``, ``unreadable``, ``no_frames``), and whose ``notes`` list conversions applied to an
otherwise usable video (``grayscale``, ``alpha``, ``partial_decode``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".gif", ".mpg", ".mpeg", ".flv", ".wmv", ".ogv", ".3gp", ".ts",
)  # fmt: skip


@dataclasses.dataclass
class DecodeResult:
    """Frames (uint8 [T, H, W, 3]) plus what happened while decoding them."""

    frames: np.ndarray | None
    fps: float = 0.0  # frame rate of the returned frames (after stride / fps resampling)
    source_fps: float = 0.0
    source_size: tuple[int, int] = (0, 0)  # (height, width) before resizing
    error: str | None = None  # reason the video is unusable, or None
    message: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)


def to_rgb(frame: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Converts a decoded frame (H, W), (H, W, 1|2|3|4), any integer/float dtype, to uint8 RGB.

    Returns the frame and a note ('grayscale' / 'alpha') when a conversion was needed. Alpha is dropped (frames are
    treated as opaque, like ffmpeg's rgb24 conversion does).
    """
    note = None
    a = np.asarray(frame)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            a = np.clip(np.nan_to_num(a) * (255.0 if a.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        elif a.dtype == np.uint16:
            a = (a >> 8).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a, note = a[..., None], "grayscale"
    if a.shape[-1] == 2:  # gray + alpha
        a, note = a[..., :1], "alpha"
    if a.shape[-1] == 1:
        a, note = np.repeat(a, 3, axis=-1), note or "grayscale"
    elif a.shape[-1] == 4:
        a, note = a[..., :3], "alpha"
    return np.ascontiguousarray(a), note


def resize_frame(frame: np.ndarray, height: int, width: int, center_crop: bool = True) -> np.ndarray:
    """Resizes a uint8 RGB frame to (height, width).

    With ``center_crop`` the frame is scaled so that it covers the target (short side fits) and the centre is cut
    out, keeping the aspect ratio; otherwise it is stretched. Downscaling is antialiased (PIL bicubic).
    """
    h, w = frame.shape[:2]
    if (h, w) == (height, width):
        return frame
    img = Image.fromarray(frame)
    if center_crop:
        scale = max(height / h, width / w)
        nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
        if (nh, nw) != (h, w):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        top, left = (nh - height) // 2, (nw - width) // 2
        img = img.crop((left, top, left + width, top + height))
    else:
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(img)


def _decode_pyav(path: str, notes: list[str]) -> tuple[float, Iterator[tuple[float, np.ndarray]]]:
    import av

    container = av.open(path)
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    fmt = (stream.codec_context.pix_fmt or "").lower()
    if fmt.startswith("gray") or fmt in ("ya8", "ya16be", "ya16le", "monow", "monob"):
        notes.append("grayscale")
    if any(t in fmt for t in ("rgba", "bgra", "argb", "abgr", "yuva", "ya8", "ya16", "gbrap")):
        notes.append("alpha")

    def frames():
        try:
            for i, fr in enumerate(container.decode(stream)):
                t = float(fr.time) if fr.time is not None else i / rate
                yield t, fr.to_ndarray(format="rgb24")
        finally:
            container.close()

    return rate, frames()


def _decode_imageio(path: str, notes: list[str]) -> tuple[float, Iterator[tuple[float, np.ndarray]]]:
    import imageio.v3 as iio

    meta = {}
    try:
        meta = iio.immeta(path)
    except Exception:  # noqa: BLE001 - metadata is optional
        pass
    rate = float(meta.get("fps") or 0) or (1000.0 / meta["duration"] if meta.get("duration") else 0) or 25.0

    def frames():
        for i, fr in enumerate(iio.imiter(path)):
            rgb, note = to_rgb(fr)
            if note and note not in notes:
                notes.append(note)
            yield i / rate, rgb

    return rate, frames()


def _sample(timed: Iterator[tuple[float, np.ndarray]], frame_stride: int, fps: float, rate: float):
    """Yields the frames to keep: every ``frame_stride``-th, or resampled to ``fps`` (latest frame at or before
    each output time ``k / fps``; frames are dropped, or repeated when ``fps`` exceeds the source rate)."""
    if fps <= 0:
        for i, (_, fr) in enumerate(timed):
            if i % frame_stride == 0:
                yield fr
        return
    k, prev, t0, t = 0, None, None, 0.0
    for t, fr in timed:
        t0 = t if t0 is None else t0
        t -= t0
        while prev is not None and k / fps < t - 1e-6:
            yield prev
            k += 1
        prev = fr
    if prev is not None:
        while k / fps < t + 1.0 / rate - 1e-6:
            yield prev
            k += 1


def read_video(
    path: str,
    *,
    max_frames: int | None = None,
    frame_stride: int = 1,
    fps: float = 0.0,
    skip_frames: int = 0,
    height: int | None = None,
    width: int | None = None,
    center_crop: bool = True,
) -> DecodeResult:
    """Decodes a video file into uint8 RGB frames, never raising on bad input.

    Args:
      path: a local video file (any container/codec ffmpeg reads; GIFs included).
      max_frames: stop after this many output frames (decoding stops early too).
      frame_stride: keep every ``frame_stride``-th decoded frame (ignored when ``fps`` > 0).
      fps: resample to this frame rate (see :func:`_sample`); 0 keeps the source rate.
      skip_frames: drop this many output frames first (used to take later segments of long videos).
      height, width: resize each kept frame (see :func:`resize_frame`); None keeps the decoded size.
      center_crop: keep the aspect ratio and crop the centre when resizing.

    Returns:
      A :class:`DecodeResult`. PyAV is tried first, then imageio's own plugins (ffmpeg, pillow for GIFs).
    """
    try:
        if os.path.getsize(path) == 0:
            return DecodeResult(None, error="empty_file", message="file is empty")
    except OSError as e:
        return DecodeResult(None, error="missing_file", message=str(e))
    frame_stride = max(1, int(frame_stride))
    errors = []
    for decoder in (_decode_pyav, _decode_imageio):
        notes: list[str] = []
        frames: list[np.ndarray] = []
        source_size, rate = (0, 0), 0.0
        try:
            rate, timed = decoder(path, notes)
            last_in, last_out = None, None
            for i, fr in enumerate(_sample(timed, frame_stride, fps, rate)):
                if i < skip_frames:
                    continue
                if source_size == (0, 0):
                    source_size = tuple(fr.shape[:2])
                if fr is not last_in:  # repeated frames (fps up-sampling) are resized once
                    last_in = fr
                    last_out = resize_frame(fr, height, width, center_crop) if height and width else fr
                frames.append(last_out)
                if max_frames is not None and len(frames) >= max_frames:
                    break
            timed.close()
        except Exception as e:  # noqa: BLE001 - any decoder failure is a data problem, not a program error
            first_line = (str(e).strip().splitlines() or [""])[0]
            errors.append(f"{decoder.__name__[8:]}: {type(e).__name__}: {first_line}"[:300])
            if not frames:
                continue
            notes.append("partial_decode")  # decoded part of the file before it broke: keep that part
        if not frames:
            errors.append(f"{decoder.__name__[8:]}: no frames")
            continue
        return DecodeResult(
            np.stack(frames),
            fps=fps if fps > 0 else rate / frame_stride,
            source_fps=rate,
            source_size=source_size,
            notes=sorted(set(notes)),
        )
    reason = "no_frames" if all(e.endswith("no frames") for e in errors) else "unreadable"
    return DecodeResult(None, error=reason, message="; ".join(errors))


def load_image(path: str, height: int, width: int, center_crop: bool = True) -> np.ndarray:
    """Reads an image file as float32 (height, width, 3) in [-1, 1], preprocessed like training frames."""
    with Image.open(path) as img:
        img.load()
        rgb, _ = to_rgb(np.asarray(img.convert("RGBA") if img.mode == "P" else img))
    return resize_frame(rgb, height, width, center_crop).astype(np.float32) / 127.5 - 1.0


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """float in [-1, 1] → uint8 (uint8 input is returned unchanged)."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.round((frames.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_video(path: str, frames: np.ndarray, fps: float = 8.0) -> str:
    """Writes (T, H, W, 3) frames (uint8, or float in [-1, 1]) as .mp4 (h264, yuv420p), .gif or .npz.

    Sizes that h264 cannot take (odd heights/widths) are padded by one pixel (edge copy) for .mp4.
    """
    frames = to_uint8(frames)
    ext = os.path.splitext(path)[1].lower()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".npz":
        np.savez_compressed(path, video=frames, fps=np.float32(fps))
        return path
    import imageio.v3 as iio

    if ext == ".gif":
        iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0)
        return path
    t, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18"} if stream.codec_context.name == "libx264" else {}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
