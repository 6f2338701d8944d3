"""Drift over chained clips: how far each clip's first frame has moved from the input image.

Chaining feeds the last frame of clip k to clip k+1, so errors compound: colours shift and details blur clip by
clip. For every clip we compare its first frame with the user's input image (and with the clip's own reference
image, which isolates the drift added by that clip):

* ``ssim_to_input``: SSIM (`dreamvideo_jax.evaluation.ssim`, the standard 11x11 Gaussian window; NaN for images
  smaller than 11 pixels) of clip k's first frame vs the input image;
* ``mean_rgb_shift``: per-channel mean of clip k's first frame minus that of the input image, in pixel levels
  (0-255), and ``color_shift`` its Euclidean norm;
* ``ssim_to_reference``: SSIM of clip k's first frame vs clip k's own reference image;
* ``contrast_ratio``: the standard deviation of clip k's first frame (grey levels) over that of the input image:
  1 = contrast kept, below 1 = washed out, above 1 = harsher.

Seams: where two clips meet, the joined video should move no more than it moves inside a clip. With ``d_t`` the
mean absolute difference (pixel levels) between frames ``t`` and ``t+1`` of the joined video:

* ``seam``: ``(B, S-1)``, ``d_t`` across each stage boundary over the median ``d_t`` inside the clips of that
  sample (1 = the boundary looks like any other frame step; above ``SEAM_FLAG`` a visible jump);
* ``loop_seam``: ``(B,)``, the step from the last frame back to the first, over the same median, which is what a
  looping player shows between repetitions (1 = seamless, for clips meant to loop).

A sample whose clips do not move at all (median 0) gets ``inf`` for any jump and ``nan`` for none.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dreamvideo_jax.evaluation.ssim import ssim

# A seam score above this is a visible jump (format_drift marks it).
SEAM_FLAG = 2.0
# ITU-R BT.601 luma weights, for the contrast of an RGB frame.
_LUMA = np.array([0.299, 0.587, 0.114])


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    if min(a.shape[:2]) < 11:
        return float("nan")
    return ssim(a, b)


def _frame_steps(video: np.ndarray) -> np.ndarray:
    """Mean absolute difference between consecutive frames of one ``(F, H, W, 3)`` uint8 video: ``(F-1,)``."""
    v = np.asarray(video, np.float64)
    return np.abs(np.diff(v, axis=0)).reshape(len(v) - 1, -1).mean(axis=1)


def _ratio(x: float, median: float) -> float:
    if median > 0:
        return float(x / median)
    return float("nan") if x == 0 else float("inf")


def _contrast(image: np.ndarray) -> float:
    return float(np.std(np.asarray(image, np.float64) @ _LUMA))


def seam_scores(video: np.ndarray, starts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Seam scores of one joined video.

    Args:
        video: uint8 ``(F, H, W, 3)``, the stages joined.
        starts: the index in ``video`` of each later stage's first frame (``S-1`` values, increasing).

    Returns:
        ``(seam, loop_seam)``: the step into each later stage, and from the last frame to the first, each over
        the median frame step inside the stages; float64 ``(S-1,)`` and a float.
    """
    steps = _frame_steps(video)
    across = np.asarray([s - 1 for s in starts], int)  # the step from frame s-1 to frame s crosses a boundary
    if len(steps) and (across.min(initial=0) < 0 or across.max(initial=0) >= len(steps)):
        raise ValueError(f"stage starts {list(starts)} are outside a video of {len(video)} frames")
    inside = np.delete(steps, across)
    median = float(np.median(inside)) if len(inside) else 0.0
    seam = np.asarray([_ratio(steps[i], median) for i in across], np.float64)
    last_to_first = float(np.abs(np.asarray(video[-1], np.float64) - np.asarray(video[0], np.float64)).mean())
    return seam, _ratio(last_to_first, median)


def chain_drift(input_images: np.ndarray, references: np.ndarray, stages: Sequence[np.ndarray],
                video: np.ndarray | None = None, starts: Sequence[int] | None = None) -> dict:
    """Drift of a batch of chains.

    Args:
        input_images: uint8 ``(B, H, W, 3)``, the user's images (stage 0's references).
        references: uint8 ``(B, S, H, W, 3)``, each stage's reference image.
        stages: ``S`` uint8 videos ``(B, F, H, W, 3)``.
        video: uint8 ``(B, F_total, H, W, 3)``, the stages as joined (default: concatenated in full).
        starts: the index in ``video`` of each later stage's first frame (default: for the full concatenation).

    Returns:
        ``{'ssim_to_input': (B, S), 'ssim_to_reference': (B, S), 'mean_rgb_shift': (B, S, 3),
        'color_shift': (B, S), 'contrast_ratio': (B, S), 'seam': (B, S-1), 'loop_seam': (B,)}`` as float64
        numpy arrays.
    """
    inp = np.asarray(input_images)
    b, s = inp.shape[0], len(stages)
    if video is None:
        video = np.concatenate([np.asarray(v) for v in stages], axis=1)
        starts = np.cumsum([np.asarray(v).shape[1] for v in stages])[:-1]
    out = {
        "ssim_to_input": np.zeros((b, s)),
        "ssim_to_reference": np.zeros((b, s)),
        "mean_rgb_shift": np.zeros((b, s, 3)),
        "color_shift": np.zeros((b, s)),
        "contrast_ratio": np.zeros((b, s)),
        "seam": np.zeros((b, s - 1)),
        "loop_seam": np.zeros((b,)),
    }
    for k, clip in enumerate(stages):
        first = np.asarray(clip)[:, 0]
        for i in range(b):
            out["ssim_to_input"][i, k] = _ssim(first[i], inp[i])
            out["ssim_to_reference"][i, k] = _ssim(first[i], references[i, k])
            shift = first[i].reshape(-1, 3).mean(0, dtype=np.float64) - inp[i].reshape(-1, 3).mean(0, dtype=np.float64)
            out["mean_rgb_shift"][i, k] = shift
            out["color_shift"][i, k] = float(np.linalg.norm(shift))
            out["contrast_ratio"][i, k] = _ratio(_contrast(first[i]), _contrast(inp[i]))
    for i in range(b):
        out["seam"][i], out["loop_seam"][i] = seam_scores(np.asarray(video[i]), starts)
    return out


def last_frame_ssim(video: np.ndarray, image: np.ndarray) -> float:
    """SSIM of one video's last frame ``(F, H, W, 3)`` vs the last frame it was given (or, in a loop, its
    reference image): how closely a first+last-frame video lands on its target."""
    return _ssim(np.asarray(video)[-1], np.asarray(image))


def format_drift(drift: dict, sample: int = 0) -> str:
    """A small table of one sample's drift, one line per stage (the seam is the step into that stage; `!` marks
    a visible jump), then the loop seam."""
    lines = ["stage  ssim_to_input  ssim_to_ref  color_shift  contrast   seam  mean_rgb_shift(R,G,B)"]
    for k in range(drift["color_shift"].shape[1]):
        r, g, bl = drift["mean_rgb_shift"][sample, k]
        s_in, s_ref = drift["ssim_to_input"][sample, k], drift["ssim_to_reference"][sample, k]
        if k == 0:
            seam = f"{'-':>6} "
        else:
            v = drift["seam"][sample, k - 1]
            seam = f"{v:>6.2f}{'!' if v > SEAM_FLAG else ' '}"
        lines.append(f"{k + 1:>5}  {s_in:>13.4f}  {s_ref:>11.4f}  {drift['color_shift'][sample, k]:>11.2f}"
                     f"  {drift['contrast_ratio'][sample, k]:>8.3f} {seam} ({r:+.2f}, {g:+.2f}, {bl:+.2f})")
    lines.append(f"loop seam (last frame -> first, over the median frame step): {drift['loop_seam'][sample]:.2f}")
    return "\n".join(lines)
