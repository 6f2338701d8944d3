"""Drift over chained clips: how far each clip's first frame has moved from the input image.

Chaining feeds the last frame of clip k to clip k+1, so errors compound: colours shift and details blur clip by
clip. For every clip we compare its first frame with the user's input image (and with the clip's own reference
image, which isolates the drift added by that clip):

* ``ssim_to_input``: SSIM (`dreamvideo_jax.evaluation.ssim`, the standard 11x11 Gaussian window; NaN for images
  smaller than 11 pixels) of clip k's first frame vs the input image;
* ``mean_rgb_shift``: per-channel mean of clip k's first frame minus that of the input image, in pixel levels
  (0-255), and ``color_shift`` its Euclidean norm;
* ``ssim_to_reference``: SSIM of clip k's first frame vs clip k's own reference image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dreamvideo_jax.evaluation.ssim import ssim


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    if min(a.shape[:2]) < 11:
        return float("nan")
    return ssim(a, b)


def chain_drift(input_images: np.ndarray, references: np.ndarray, stages: Sequence[np.ndarray]) -> dict:
    """Drift of a batch of chains.

    Args:
        input_images: uint8 ``(B, H, W, 3)``, the user's images (stage 0's references).
        references: uint8 ``(B, S, H, W, 3)``, each stage's reference image.
        stages: ``S`` uint8 videos ``(B, F, H, W, 3)``.

    Returns:
        ``{'ssim_to_input': (B, S), 'ssim_to_reference': (B, S), 'mean_rgb_shift': (B, S, 3),
        'color_shift': (B, S)}`` as float64 numpy arrays.
    """
    inp = np.asarray(input_images)
    b, s = inp.shape[0], len(stages)
    out = {
        "ssim_to_input": np.zeros((b, s)),
        "ssim_to_reference": np.zeros((b, s)),
        "mean_rgb_shift": np.zeros((b, s, 3)),
        "color_shift": np.zeros((b, s)),
    }
    for k, video in enumerate(stages):
        first = np.asarray(video)[:, 0]
        for i in range(b):
            out["ssim_to_input"][i, k] = _ssim(first[i], inp[i])
            out["ssim_to_reference"][i, k] = _ssim(first[i], references[i, k])
            shift = first[i].reshape(-1, 3).mean(0, dtype=np.float64) - inp[i].reshape(-1, 3).mean(0, dtype=np.float64)
            out["mean_rgb_shift"][i, k] = shift
            out["color_shift"][i, k] = float(np.linalg.norm(shift))
    return out


def format_drift(drift: dict, sample: int = 0) -> str:
    """A small table of one sample's drift, one line per stage."""
    lines = ["stage  ssim_to_input  ssim_to_ref  color_shift  mean_rgb_shift(R,G,B)"]
    for k in range(drift["color_shift"].shape[1]):
        r, g, bl = drift["mean_rgb_shift"][sample, k]
        s_in, s_ref = drift["ssim_to_input"][sample, k], drift["ssim_to_reference"][sample, k]
        lines.append(f"{k + 1:>5}  {s_in:>13.4f}  {s_ref:>11.4f}  {drift['color_shift'][sample, k]:>11.2f}"
                     f"  ({r:+.2f}, {g:+.2f}, {bl:+.2f})")
    return "\n".join(lines)
