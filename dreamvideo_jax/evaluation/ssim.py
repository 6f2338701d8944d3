"""SSIM (Wang et al., 2004) and FFF_SSIM, the SSIM of a generated video's first frame against the real one.

The standard formulation: an 11x11 Gaussian window with sigma 1.5 (the filter is truncated at 3.5 sigma, radius
5), constants K1 = 0.01 and K2 = 0.03 on data range 255, population (not sample) variances, the SSIM map averaged
over the image with a 5-pixel border dropped (where the window would leave the image), then averaged over the
three colour channels. Computed in float64, it equals

    skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255)

to rounding. Borders are filtered with scipy's ``reflect`` mode as scikit-image does (they are cropped anyway).
"""

from __future__ import annotations

import numpy as np

K1, K2 = 0.01, 0.03
SIGMA = 1.5
TRUNCATE = 3.5  # radius int(3.5 * 1.5 + 0.5) = 5 -> an 11x11 window
DATA_RANGE = 255.0


def _check_uint8_pair(a, b, what: str):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise TypeError(f"{what} takes uint8 images; got {a.dtype} and {b.dtype} (use data.video_io.to_uint8)")
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {a.shape} vs {b.shape}; resize one of them first")
    return a, b


def _ssim_channel(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.ndimage import gaussian_filter

    def filt(z):
        return gaussian_filter(z, sigma=SIGMA, truncate=TRUNCATE, mode="reflect")

    ux, uy = filt(x), filt(y)
    vx = filt(x * x) - ux * ux
    vy = filt(y * y) - uy * uy
    vxy = filt(x * y) - ux * uy
    c1, c2 = (K1 * DATA_RANGE) ** 2, (K2 * DATA_RANGE) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = int(TRUNCATE * SIGMA + 0.5)
    return float(s[pad:-pad, pad:-pad].mean(dtype=np.float64))


def ssim(a, b) -> float:
    """SSIM of two uint8 images `(H, W, 3)` (or `(H, W)`), in [-1, 1] (1 = identical). H and W must be >= 11."""
    a, b = _check_uint8_pair(a, b, "ssim")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3 or min(a.shape[:2]) < 11:
        raise ValueError(f"ssim takes (H, W, C) or (H, W) images with H, W >= 11; got {a.shape}")
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[-1])]))


def ssim_batch(a, b) -> np.ndarray:
    """Per-image SSIM of two uint8 batches `(N, H, W, 3)` -> float64 `(N,)`."""
    a, b = _check_uint8_pair(a, b, "ssim_batch")
    if a.ndim != 4:
        raise ValueError(f"ssim_batch takes (N, H, W, C) batches; got {a.shape}")
    return np.asarray([ssim(x, y) for x, y in zip(a, b)], np.float64)


def first_frame_ssim(generated, real_first_frames) -> np.ndarray:
    """FFF_SSIM per video: SSIM of frame 0 of each generated video `(N, T, H, W, 3)` against the real first frame
    `(N, H, W, 3)` (or the real videos `(N, T', H, W, 3)`, whose frame 0 is used). All uint8, same H and W."""
    g = np.asarray(generated)
    r = np.asarray(real_first_frames)
    if g.ndim != 5:
        raise ValueError(f"generated videos must be (N, T, H, W, 3); got {g.shape}")
    if r.ndim == 5:
        r = r[:, 0]
    return ssim_batch(g[:, 0], r)
