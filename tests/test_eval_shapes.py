"""Moving-shapes demo metrics on ground-truth clips from the moving_shapes data module."""

import numpy as np
import pytest

from dreamvideo_jax.data.moving_shapes import MOTIONS, STILL, ClipSpec, generate_clip
from dreamvideo_jax.evaluation.shapes import (
    centroids,
    colour_accuracy,
    direction_accuracy,
    identity_retention,
    identity_scores,
    motion_direction,
    object_masks,
    predicted_directions,
    shapes_first_frame_ssim,
    shapes_metrics,
)

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "up-left": "down-right",
            "down-right": "up-left", "up-right": "down-left", "down-left": "up-right", STILL: STILL}  # fmt: skip


def _clips(n=60, spec=ClipSpec()):
    clips = [generate_clip(0, split, i, spec) for split in ("train", "test") for i in range(n // 2)]
    assert {c["motion"] for c in clips} == set(MOTIONS)  # every direction and "still" are covered
    return clips


def test_ground_truth_clips_score_perfectly():
    clips = _clips()
    videos = np.stack([c["video"] for c in clips])
    captions = [c["caption"] for c in clips]
    assert direction_accuracy(videos, captions) == 1.0
    assert predicted_directions(videos) == [c["motion"] for c in clips]
    assert shapes_first_frame_ssim(videos, videos[:, 0]) == 1.0
    np.testing.assert_array_equal(identity_scores(videos), 1.0)
    assert colour_accuracy(videos, captions) == 1.0
    m = shapes_metrics(videos, captions, images=videos[:, 0])
    assert m["direction_accuracy"] == 1.0 and m["fff_ssim"] == 1.0 and m["identity_retention"] == 1.0
    assert m["no_object"] == 0 and m["num_videos"] == len(clips)
    # The tracked centroids are the ones the data module records.
    for c in clips[:10]:
        np.testing.assert_allclose(centroids(object_masks(c["video"])), c["centroids"], atol=1e-4)


def test_reversed_clips_score_the_opposite_direction():
    clips = _clips()
    reversed_videos = np.stack([c["video"][::-1] for c in clips])
    got = predicted_directions(reversed_videos)
    assert got == [OPPOSITE[c["motion"]] for c in clips]
    moving = [i for i, c in enumerate(clips) if c["motion"] != STILL]
    assert direction_accuracy(reversed_videos[moving], [clips[i]["caption"] for i in moving]) == 0.0
    # A different first frame lowers FFF_SSIM.
    assert shapes_first_frame_ssim(reversed_videos[moving], np.stack([clips[i]["video"][0] for i in moving])) < 0.99


def test_robust_to_noise_and_larger_clips():
    rng = np.random.RandomState(0)
    clips = _clips(40, ClipSpec(size=64, frames=16))
    noisy = np.stack([np.clip(c["video"] + rng.normal(0, 8, c["video"].shape), 0, 255).astype(np.uint8)
                      for c in clips])  # fmt: skip
    assert direction_accuracy(noisy, [c["caption"] for c in clips]) == 1.0
    assert identity_retention(noisy) > 0.9
    # float videos in [-1, 1] (a sampler's output) are accepted.
    as_float = clips[0]["video"].astype(np.float32) / 127.5 - 1.0
    assert motion_direction(as_float) == clips[0]["motion"]


def test_background_method_tracks_moving_objects():
    clips = [c for c in _clips() if c["motion"] != STILL][:12]
    videos = np.stack([c["video"] for c in clips])
    assert direction_accuracy(videos, [c["caption"] for c in clips], method="background") == 1.0


def test_identity_drops_when_colour_or_size_changes():
    clip = next(c for c in _clips() if c["colour"] == "red" and c["motion"] != STILL)
    video = clip["video"].copy()
    mask = object_masks(video)
    recoloured = video.copy()
    recoloured[4:][mask[4:]] = (40, 70, 230)  # turns blue halfway
    score = identity_scores(recoloured[None])[0]
    assert score == pytest.approx(3 / 7, abs=1e-9)  # frames 1-3 keep it, frames 4-7 score 0
    shrunk = video.copy()
    for t in range(1, len(video)):  # keep only half of the object's pixels after frame 0
        ys, xs = np.nonzero(mask[t])
        keep = np.arange(len(ys)) % 2 == 0
        shrunk[t, ys[~keep], xs[~keep]] = video[0, 0, 0]
    assert 0.4 < identity_scores(shrunk[None])[0] < 0.6
    empty = np.repeat(video[:1, :1, :1], video.shape[0], 0).repeat(video.shape[1], 1).repeat(video.shape[2], 2)
    assert motion_direction(empty) == "none" and identity_scores(empty[None])[0] == 0.0
    with pytest.raises(ValueError, match="captions"):
        direction_accuracy(video[None], [])
