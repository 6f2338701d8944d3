"""Fréchet distance, SSIM / FFF_SSIM and Inception Score against direct reference computations."""

import numpy as np
import pytest
import scipy.linalg
from scipy.ndimage import gaussian_filter

from dreamvideo_jax.evaluation.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_features,
)
from dreamvideo_jax.evaluation.inception_score import inception_score
from dreamvideo_jax.evaluation.ssim import first_frame_ssim, ssim, ssim_batch


def _direct_fd(x, y, ddof=1):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False, ddof=ddof), np.cov(y, rowvar=False, ddof=ddof)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("ddof", [1, 0])
def test_frechet_matches_direct_computation_with_streaming_stats(ddof):
    rng = np.random.RandomState(0)
    x = rng.randn(300, 16) @ rng.randn(16, 16) + 3.0
    y = rng.randn(257, 16) * 1.5 + 2.5
    direct = _direct_fd(x, y, ddof)
    stats_x, stats_y = FeatureStats(), FeatureStats()
    for batch in np.array_split(x, 7):  # uneven batches, one at a time
        stats_x.update(batch)
    for batch in np.array_split(y, 3):
        stats_y.update(batch)
    np.testing.assert_allclose(stats_x.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats_x.cov(ddof), np.cov(x, rowvar=False, ddof=ddof), rtol=1e-10, atol=1e-10)
    ours = frechet_distance(stats_x.mean, stats_x.cov(ddof), stats_y.mean, stats_y.cov(ddof))
    assert ours == pytest.approx(direct, rel=1e-9)
    assert frechet_distance_from_features(x, y, ddof=ddof) == pytest.approx(direct, rel=1e-9)


def test_feature_stats_merge_save_load(tmp_path):
    rng = np.random.RandomState(1)
    x = rng.randn(100, 5) * 1e3 + 1e4  # large offset: the centred update keeps precision
    whole = FeatureStats().update(x)
    a, b = FeatureStats().update(x[:37]), FeatureStats(meta={"shard": 2}).update(x[37:])
    a.merge(b)
    np.testing.assert_allclose(a.cov(), np.cov(x, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(a.mean, whole.mean, rtol=1e-14)
    path = a.save(str(tmp_path / "stats.npz"))
    back = FeatureStats.load(path)
    assert back.n == 100 and back.dim == 5
    np.testing.assert_array_equal(back.cov(), a.cov())
    with pytest.raises(ValueError, match="feature size"):
        back.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        FeatureStats().update(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats().update(np.zeros((1, 3))).cov()


def test_frechet_same_set_is_zero_and_shift_is_squared_norm():
    rng = np.random.RandomState(2)
    x = rng.randn(500, 8)
    assert abs(frechet_distance_from_features(x, x)) < 1e-8
    shift = np.arange(8, dtype=np.float64)
    assert frechet_distance_from_features(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


# --------------------------------------------------------------------------------------------------- SSIM


def _skimage_ssim(a, b):
    from skimage.metrics import structural_similarity

    return structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255)  # fmt: skip


def _real_images():
    from skimage import data

    return {"astronaut": data.astronaut(), "chelsea": data.chelsea()[50:250, 100:400],
            "coffee": data.coffee()[100:300, 150:350], "rocket": data.rocket()[:300, 200:400]}  # fmt: skip


def test_ssim_equals_skimage_on_real_images():
    rng = np.random.RandomState(0)
    for name, img in _real_images().items():
        noisy = np.clip(img.astype(np.int16) + rng.randint(-40, 41, img.shape), 0, 255).astype(np.uint8)
        shifted = np.roll(img, (3, -5), axis=(0, 1))
        darker = (img * 0.7).astype(np.uint8)
        blurred = gaussian_filter(img, (2, 2, 0))
        assert ssim(img, img) == 1.0
        for other in (noisy, shifted, darker, blurred):
            ref = _skimage_ssim(img, other)
            assert ssim(img, other) == pytest.approx(ref, abs=1e-10), name
            assert ref < 0.999
    from skimage.metrics import structural_similarity

    gray, flipped = _real_images()["astronaut"][..., 0], _real_images()["astronaut"][::-1, :, 0]
    ref = structural_similarity(gray, flipped, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=255)  # fmt: skip
    assert ssim(gray, flipped) == pytest.approx(ref, abs=1e-10)


def test_ssim_rejects_bad_inputs_and_batches():
    img = _real_images()["chelsea"]
    with pytest.raises(TypeError, match="uint8"):
        ssim(img.astype(np.float32), img.astype(np.float32))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(img, img[:-1])
    frames = np.stack([img[:64, :64], img[64:128, :64]])
    videos = np.stack([frames, frames[::-1]])  # (2, 2, 64, 64, 3)
    per = ssim_batch(frames, frames[::-1])
    assert per.shape == (2,) and per[0] == pytest.approx(_skimage_ssim(frames[0], frames[1]), abs=1e-10)
    fff = first_frame_ssim(videos, frames)  # real first frames: frames[0] for video 0, frames[1] for video 1
    assert fff[0] == 1.0 and fff[1] == pytest.approx(_skimage_ssim(frames[1], frames[1]))
    np.testing.assert_array_equal(first_frame_ssim(videos, videos), [1.0, 1.0])


# ------------------------------------------------------------------------------------------ Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((100, 101)), num_splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = inception_score(probs=np.full((50, 7), 1 / 7), num_splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [1, 4, 101])
def test_inception_score_of_confident_distinct_classes_is_their_count(k):
    labels = np.tile(np.arange(k), 10)  # every split sees each of the k classes equally often
    logits = np.full((len(labels), 101), -1e4)
    logits[np.arange(len(labels)), labels] = 1e4
    mean, std = inception_score(logits, num_splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    onehot = np.eye(101)[labels]
    assert inception_score(probs=onehot, num_splits=10)[0] == pytest.approx(k, rel=1e-12)


def test_inception_score_matches_reference_formula_on_random_logits():
    rng = np.random.RandomState(0)
    logits = rng.randn(1000, 101) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref = []
    for i in range(10):  # StyleGAN-V / improved-GAN split formula
        part = p[i * 100 : (i + 1) * 100]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        ref.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(logits, num_splits=10)
    assert mean == pytest.approx(np.mean(ref), rel=1e-10) and std == pytest.approx(np.std(ref), rel=1e-8)
    with pytest.raises(ValueError, match="num_splits"):
        inception_score(logits[:5], num_splits=10)
