"""Fréchet Video Distance (Unterthiner et al., 2018) with the TF-Hub Kinetics-400 I3D.

Protocol (the original FVD code): each clip uint8 -> bilinear 224x224 -> [-1, 1]; I3D's 400 logits averaged over
time as the feature; Fréchet distance between Gaussians fitted to the real and generated features (see
:mod:`.frechet` for the sqrtm and covariance conventions). The standard comparison protocol is StyleGAN-V's
``fvd2048_16f``: 2048 real and 2048 generated clips of 16 consecutive frames. FVD with few clips is biased
upwards and I3D features are content-biased (Ge et al., CVPR 2024): report N, frames, resolution and frame
stride with every number (:func:`fvd_protocol` gives the fields).
"""

from __future__ import annotations

from typing import Optional

from dreamvideo_jax.evaluation.frechet import FeatureStats, frechet_distance_from_stats
from dreamvideo_jax.evaluation.i3d import I3DFeatureExtractor, default_extractor


def _stats(videos, extractor: I3DFeatureExtractor) -> FeatureStats:
    if isinstance(videos, FeatureStats):
        return videos
    return extractor.stats(videos)


def frechet_video_distance(
    real,
    fake,
    *,
    extractor: Optional[I3DFeatureExtractor] = None,
    ddof: int = 1,
) -> float:
    """FVD between two sets of clips.

    Args:
      real, fake: uint8 arrays `(N, T, H, W, 3)` (N >= 2, T >= 9; 16 frames is the standard), or iterables of
        such batches, or precomputed :class:`FeatureStats` (e.g. cached real-data statistics).
      extractor: an :class:`I3DFeatureExtractor`; default: the shared one with the shipped weights and the
        original FVD resize.
      ddof: covariance normalisation, N - ddof (1 = unbiased, the original FVD; 0 = StyleGAN-V).

    Returns:
      FVD as a float (0 for identical sets, up to sqrtm round-off).
    """
    extractor = extractor or default_extractor()
    return frechet_distance_from_stats(_stats(real, extractor), _stats(fake, extractor), ddof=ddof)


def fvd_protocol(num_real: int, num_fake: int, frames: int, resolution: tuple[int, int], stride: int = 1,
                 resize: str = "tf1", ddof: int = 1) -> dict:  # fmt: skip
    """The settings to report next to an FVD number."""
    return {
        "num_real": int(num_real), "num_fake": int(num_fake), "frames": int(frames),
        "source_resolution": [int(r) for r in resolution], "frame_stride": int(stride),
        "network": "i3d_kinetics400_tfhub", "feature": "logits_400_time_mean", "network_resolution": 224,
        "resize": resize, "covariance_ddof": int(ddof), "sqrtm": "scipy.linalg.sqrtm (real part)",
    }  # fmt: skip
