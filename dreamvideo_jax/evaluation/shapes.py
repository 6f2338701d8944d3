"""Metrics for the moving-shapes demo: does a generated clip move its shape the way the caption says, does its
first frame keep the input image, and does the shape keep its identity (colour and size) over the clip.

Object mask. Moving-shapes frames are a saturated shape (every palette colour has chroma ``max(RGB) - min(RGB)``
>= 180) on a faint grey texture (chroma < 15), so the object is the set of pixels whose chroma exceeds
``chroma_threshold`` (60 by default, tolerant to blur and noise in generated frames). Pass
``method="background"`` to instead take pixels that differ from a per-pixel median-over-frames background by
more than ``diff_threshold`` (L2 in RGB) -- useful for clips whose colours are washed out; it cannot see an
object that does not move.

Motion direction. The object's centroid (mean of mask pixel centres, ``(x, y)`` with y down, as
:mod:`dreamvideo_jax.data.moving_shapes` records it) is tracked over the frames where the mask is not empty; a
least-squares line through the centroids gives the displacement from the first to the last frame (robust to a
noisy frame), which :func:`~dreamvideo_jax.data.moving_shapes.classify_displacement` names. Below
``still_px`` (default a quarter of a pixel per frame) the clip counts as ``"still"``; a clip in which no
object is found in at least two frames gets ``"none"`` (always wrong).

Identity retention, per frame ``t >= 1`` against frame 0: colour score ``max(0, 1 - |mean RGB_t - mean RGB_0| /
100)`` (the closest two palette colours are 142 apart, so swapping to another palette colour scores 0) times size
score ``min(area_t, area_0) / max(area_t, area_0)``; a frame without an object scores 0; the clip's score is
the mean over frames, in [0, 1].
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from dreamvideo_jax.data.moving_shapes import COLOURS, STILL, classify_displacement, parse_caption
from dreamvideo_jax.evaluation.ssim import first_frame_ssim

NONE = "none"  # no object found
COLOUR_SCALE = 100.0


def _as_video(video) -> np.ndarray:
    from dreamvideo_jax.data.video_io import to_uint8

    v = to_uint8(np.asarray(video))
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"a video is (T, H, W, 3) uint8 (or float in [-1, 1]); got {v.shape}")
    return v


def _as_videos(videos) -> list[np.ndarray]:
    if isinstance(videos, np.ndarray) and videos.ndim == 4:
        return [_as_video(videos)]
    return [_as_video(v) for v in videos]


def object_masks(video, method: str = "chroma", chroma_threshold: float = 60.0,
                 diff_threshold: float = 60.0) -> np.ndarray:  # fmt: skip
    """Boolean `(T, H, W)` object masks of a clip `(T, H, W, 3)` (see the module docstring)."""
    v = _as_video(video).astype(np.int16)
    if method == "chroma":
        return (v.max(-1) - v.min(-1)) > chroma_threshold
    if method == "background":
        bg = np.median(v, axis=0)
        return np.linalg.norm(v - bg, axis=-1) > diff_threshold
    raise ValueError(f"method={method!r}; use 'chroma' or 'background'")


def centroids(masks: np.ndarray) -> np.ndarray:
    """`(T, 2)` float `(x, y)` centroids of pixel centres per mask; NaN where a mask is empty."""
    out = np.full((len(masks), 2), np.nan)
    for t, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        if len(xs):
            out[t] = xs.mean() + 0.5, ys.mean() + 0.5
    return out


def displacement(video, **mask_kw) -> Optional[tuple[float, float]]:
    """First-to-last-frame displacement `(dx, dy)` of the object from a least-squares fit of its centroids, or
    None when the object is found in fewer than two frames."""
    c = centroids(object_masks(video, **mask_kw))
    t = np.arange(len(c), dtype=np.float64)
    ok = ~np.isnan(c[:, 0])
    if ok.sum() < 2:
        return None
    slope = np.polyfit(t[ok], c[ok], 1)[0]  # (2,) pixels per frame for x and y
    span = len(c) - 1
    return float(slope[0] * span), float(slope[1] * span)


def motion_direction(video, still_px: Optional[float] = None, **mask_kw) -> str:
    """The motion name of a clip (one of moving_shapes.MOTIONS, or "none" when no object is tracked)."""
    d = displacement(video, **mask_kw)
    if d is None:
        return NONE
    frames = len(_as_video(video))
    threshold = 0.25 * max(frames - 1, 1) if still_px is None else still_px
    return classify_displacement(d[0], d[1], still_px=threshold)


def predicted_directions(videos, **kw) -> list[str]:
    return [motion_direction(v, **kw) for v in _as_videos(videos)]


def direction_accuracy(videos, captions: Sequence[str | bytes], **kw) -> float:
    """Fraction of clips whose tracked motion is the one their caption names ("moves left", "stays still")."""
    vids = _as_videos(videos)
    if len(vids) != len(captions):
        raise ValueError(f"{len(vids)} videos vs {len(captions)} captions")
    if not vids:
        raise ValueError("no videos")
    want = [parse_caption(c)[2] for c in captions]
    got = [motion_direction(v, **kw) for v in vids]
    return float(np.mean([g == w for g, w in zip(got, want)]))


def _object_colour_and_area(frame_mask_pairs):
    out = []
    for frame, mask in frame_mask_pairs:
        area = int(mask.sum())
        out.append((frame[mask].astype(np.float64).mean(0) if area else None, area))
    return out


def identity_scores(videos, method: str = "chroma", **mask_kw) -> np.ndarray:
    """Per-clip identity retention in [0, 1] (colour and size of the object kept over the frames)."""
    scores = []
    for v in _as_videos(videos):
        masks = object_masks(v, method=method, **mask_kw)
        stats = _object_colour_and_area(zip(v, masks))
        colour0, area0 = stats[0]
        if colour0 is None or len(stats) < 2:
            scores.append(0.0)
            continue
        per_frame = []
        for colour, area in stats[1:]:
            if colour is None:
                per_frame.append(0.0)
                continue
            c = max(0.0, 1.0 - float(np.linalg.norm(colour - colour0)) / COLOUR_SCALE)
            s = min(area, area0) / max(area, area0)
            per_frame.append(c * s)
        scores.append(float(np.mean(per_frame)))
    return np.asarray(scores, np.float64)


def identity_retention(videos, **kw) -> float:
    """Mean identity-retention score over clips (1 = colour and size unchanged in every frame)."""
    return float(np.mean(identity_scores(videos, **kw)))


def object_colour_names(videos, **mask_kw) -> list[str]:
    """Nearest palette colour name of the frame-0 object of each clip ("none" without an object)."""
    names, palette = list(COLOURS), np.asarray(list(COLOURS.values()), np.float64)
    out = []
    for v in _as_videos(videos):
        mask = object_masks(v[:1], **mask_kw)[0]
        if not mask.any():
            out.append(NONE)
            continue
        colour = v[0][mask].astype(np.float64).mean(0)
        out.append(names[int(np.argmin(np.linalg.norm(palette - colour, axis=1)))])
    return out


def colour_accuracy(videos, captions: Sequence[str | bytes], **mask_kw) -> float:
    """Fraction of clips whose frame-0 object has the caption's colour."""
    want = [parse_caption(c)[1] for c in captions]
    got = object_colour_names(videos, **mask_kw)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} videos vs {len(want)} captions")
    return float(np.mean([g == w for g, w in zip(got, want)]))


def shapes_first_frame_ssim(videos, images) -> float:
    """Mean FFF_SSIM: generated frame 0 vs the input image, uint8 `(N, T, H, W, 3)` and `(N, H, W, 3)`."""
    from dreamvideo_jax.data.video_io import to_uint8

    return float(np.mean(first_frame_ssim(to_uint8(np.asarray(videos)), to_uint8(np.asarray(images)))))


def shapes_metrics(videos, captions: Sequence[str | bytes], images=None) -> dict:
    """All moving-shapes metrics of generated clips `(N, T, H, W, 3)` with their captions (and input images)."""
    vids = _as_videos(videos)
    got = [motion_direction(v) for v in vids]
    want = [parse_caption(c)[2] for c in captions]
    out = {
        "num_videos": len(vids),
        "direction_accuracy": float(np.mean([g == w for g, w in zip(got, want)])),
        "still_predicted": int(sum(g == STILL for g in got)),
        "no_object": int(sum(g == NONE for g in got)),
        "identity_retention": identity_retention(vids),
        "colour_accuracy": colour_accuracy(vids, captions),
    }
    if images is not None:
        out["fff_ssim"] = shapes_first_frame_ssim(np.stack(vids), images)
    return out
