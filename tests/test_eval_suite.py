"""MetricSuite: every available metric over a stream of batches, skip reasons, and resuming from saved state.

The networks here are small stand-ins (a pixel-statistics feature for FVD, a tiny random C3D) so the plumbing
is tested quickly; the real networks have their own tests.
"""

import numpy as np
import pytest

from dreamvideo_jax.data.moving_shapes import ClipSpec, generate_clip
from dreamvideo_jax.evaluation.frechet import FeatureStats, frechet_distance_from_stats
from dreamvideo_jax.evaluation.suite import MetricSuite


class PixelStatsExtractor:
    """Stand-in for I3DFeatureExtractor: per-frame mean colour as the feature."""

    def update(self, stats, videos):
        return stats.update(videos.reshape(len(videos), videos.shape[1], -1, 3).mean(2).reshape(len(videos), -1))


def _batches(frames=16, n=12, batch=4):
    clips = [generate_clip(3, "train", i, ClipSpec(size=32, frames=frames, centred_start=0)) for i in range(n)]
    for i in range(0, n, batch):
        part = clips[i : i + batch]
        yield np.stack([c["video"] for c in part]), [c["caption"] for c in part]


@pytest.fixture(scope="module")
def tiny_c3d():
    import jax
    import jax.numpy as jnp

    from dreamvideo_jax.evaluation.c3d import C3D, C3DClassifier, C3DConfig

    cfg = C3DConfig(widths=(4, 4, 4, 4, 8, 8, 8, 8), fc=16)
    shapes = jax.eval_shape(C3D(cfg).init, jax.random.key(0), jnp.zeros((1, 16, 112, 112, 3)))["params"]
    rng = np.random.RandomState(0)
    params = jax.tree_util.tree_map(lambda s: (rng.randn(*s.shape) * 0.05).astype(np.float32), shapes)
    params = dict(params, mean=np.full((16, 112, 112, 3), 100.0, np.float32))
    return C3DClassifier(params, cfg, batch_size=4)


def test_suite_on_perfect_generations_and_resume(tmp_path, tiny_c3d):
    def make():
        return MetricSuite(i3d=PixelStatsExtractor(), c3d_weights=tiny_c3d, clip_model=None, shapes=True,
                           is_splits=4)  # fmt: skip

    whole = make()
    for real, caps in _batches():  # generated = real: every metric at its best
        whole.update(real, real, caps)
    res = whole.result()
    m = res["metrics"]
    assert m["fff_ssim"] == 1.0 and m["direction_accuracy"] == 1.0 and m["identity_retention"] == 1.0
    assert m["colour_accuracy"] == 1.0 and abs(m["fvd"]) < 1e-2 and 1.0 <= m["is_mean"] <= 3.0
    assert set(res["skipped"]) == {"fff_clip", "clip_sim"} and "CLIP" in res["skipped"]["clip_sim"]
    assert res["protocol"]["num_videos"] == 12 and res["protocol"]["frames"] == 16
    assert res["protocol"]["resolution"] == [32, 32] and res["protocol"]["is_splits"] == 4

    # Interrupted after two batches, resumed from the saved state: the same result.
    first = make()
    batches = list(_batches())
    for real, caps in batches[:2]:
        first.update(real, real, caps)
    path = first.save(str(tmp_path / "state.npz"))
    resumed = make().load(path)
    assert resumed.num == 8
    real, caps = batches[2]
    resumed.update(real, real, caps)
    assert resumed.result() == res


def test_suite_skips_what_cannot_run(tiny_c3d):
    suite = MetricSuite(i3d=PixelStatsExtractor(), c3d_weights=tiny_c3d, clip_model="/nonexistent/clip")
    for real, caps in _batches(frames=8, n=4):
        fake = np.ascontiguousarray(real[:, :, ::-1])  # flipped upside down
        suite.update(real, fake, caps, first_frames=np.stack([np.kron(f, np.ones((2, 2, 1), np.uint8))
                                                              for f in real[:, 0]]))  # fmt: skip
    res = suite.result()
    assert "9" in res["skipped"]["fvd"] and "8 frames" in res["skipped"]["fvd"]
    assert "16" in res["skipped"]["is"]
    assert "/nonexistent/clip" in res["skipped"]["fff_clip"]
    assert 0 < res["metrics"]["fff_ssim"] < 0.9
    assert any("resized" in n for n in res["notes"])  # 64x64 conditioning images vs 32x32 generations
    assert "direction_accuracy" not in res["metrics"]
    with pytest.raises(ValueError, match="batch shapes changed"):
        suite.update(np.zeros((1, 8, 16, 16, 3), np.uint8), np.zeros((1, 8, 16, 16, 3), np.uint8), ["x"])


def test_suite_fvd_matches_direct_stats():
    suite = MetricSuite(i3d=PixelStatsExtractor(), shapes=False)
    real_stats, fake_stats = FeatureStats(), FeatureStats()
    ex = PixelStatsExtractor()
    for real, caps in _batches(n=8):
        fake = np.clip(real.astype(np.int16) + 20, 0, 255).astype(np.uint8)
        suite.update(real, fake, caps)
        ex.update(real_stats, real)
        ex.update(fake_stats, fake)
    assert suite.result()["metrics"]["fvd"] == pytest.approx(frechet_distance_from_stats(real_stats, fake_stats))
