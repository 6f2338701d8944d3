"""moving_shapes: every clip moves as its caption says, stays in frame, is deterministic; held-out splits."""

import numpy as np
import pytest

from dreamvideo_jax.data import build, moving_shapes as M


def _pixel_centroids(video: np.ndarray, colour: str) -> np.ndarray:
    """(x, y) centroid per frame of the pixels close to the caption's colour (independent of the metadata)."""
    rgb = np.asarray(M.COLOURS[colour], np.float32)
    dist = np.abs(video.astype(np.float32) - rgb).max(-1)
    out = []
    for mask in dist < 40:
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0, "object not visible"
        out.append((xs.mean() + 0.5, ys.mean() + 0.5))
    return np.asarray(out)


def _check_clip(ex, size, frames):
    video = ex["video"]
    assert video.shape == (frames, size, size, 3) and video.dtype == np.uint8
    caption = ex["caption"].decode() if isinstance(ex["caption"], bytes) else ex["caption"]
    shape, colour, motion = M.parse_caption(caption)
    as_text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    assert (as_text(ex["shape"]), as_text(ex["colour"]), as_text(ex["motion"])) == (shape, colour, motion)
    c = _pixel_centroids(video, colour)
    np.testing.assert_allclose(c, ex["centroids"], atol=1e-4)
    # The displacement first → last frame names the captioned motion; each step moves the same way.
    assert M.classify_displacement(*(c[-1] - c[0])) == motion, (caption, c[0], c[-1])
    steps = np.diff(c, axis=0)
    np.testing.assert_allclose(steps, np.broadcast_to(ex["velocity"], steps.shape), atol=1e-4)
    if motion != M.STILL:
        assert np.all(np.sign(steps) == np.sign(M.DIRECTION_VECTORS[motion]))
    # Fully inside the frame: the object's pixel count never changes (nothing is clipped at a border).
    counts = [(np.abs(f.astype(np.float32) - np.asarray(M.COLOURS[colour])).max(-1) < 40).sum() for f in video]
    assert len(set(counts)) == 1
    x0, y0 = ex["start"]
    s = int(ex["object_size"])
    vx, vy = ex["velocity"]
    for t in range(frames):
        assert 0 <= x0 + t * vx and x0 + t * vx + s <= size and 0 <= y0 + t * vy and y0 + t * vy + s <= size
    return shape, colour, motion


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_every_clip_moves_as_captioned(split):
    seen = set()
    for i in range(150):
        seen.add(_check_clip(M.generate_clip(3, split, i), 32, 8))
    if split == "test":
        assert seen <= set(M.HELD_OUT)
    else:
        assert not seen & set(M.HELD_OUT)
        assert {m for _, _, m in seen} == set(M.MOTIONS)  # every motion appears


def test_other_sizes_and_determinism():
    spec = M.ClipSpec(size=48, frames=12)
    for i in range(20):
        _check_clip(M.generate_clip(1, "train", i, spec), 48, 12)
    a, b, c = M.generate_clip(5, "train", 7), M.generate_clip(5, "train", 7), M.generate_clip(6, "train", 7)
    np.testing.assert_array_equal(a["video"], b["video"])
    assert a["caption"] == b["caption"]
    assert not np.array_equal(a["video"], c["video"])
    with pytest.raises(ValueError, match="does not fit"):
        M.ClipSpec(size=16, frames=16).resolved()


def test_first_frame_says_nothing_about_the_motion():
    """centred_start (default): frame 0 is drawn from one box for every motion, so an image-to-video model cannot
    read the direction off the reference image; with centred_start=0 the box follows the motion."""
    spec = M.ClipSpec().resolved()
    assert (spec.min_speed, spec.max_speed) == (1, 1)  # 32x32x8: 10 px + 2 * 7 px fits, 2 px/frame does not
    travel = (spec.frames - 1) * spec.max_speed
    starts = {m: [] for m in M.MOTIONS}
    for i in range(400):
        ex = M.generate_clip(0, "train", i)
        room = spec.size - int(ex["object_size"])
        assert all(travel <= c <= room - travel for c in ex["start"]), (ex["motion"], ex["start"])
        starts[str(ex["motion"])].append(ex["start"][0])
    assert abs(np.mean(starts["left"]) - np.mean(starts["right"])) < 1.5
    old = M.ClipSpec(centred_start=0)
    lefts = [M.generate_clip(0, "train", i, old) for i in range(400)]
    left_x = np.mean([e["start"][0] for e in lefts if e["motion"] == "left"])
    right_x = np.mean([e["start"][0] for e in lefts if e["motion"] == "right"])
    assert left_x - right_x > 5  # left-movers start on the right
    with pytest.raises(ValueError, match="centred_start=1 needs room"):
        M.ClipSpec(size=16, frames=8).resolved()
    M.ClipSpec(size=16, frames=8, centred_start=0).resolved()
    assert M.config_name() != M.config_name(centred_start=0)


def test_vocabulary_constants():
    assert len(M.DIRECTIONS) == 8 and M.MOTIONS[-1] == "still" and len(M.COLOURS) == 6
    assert {"circle", "square", "triangle"} <= set(M.SHAPES)
    assert M.caption_for("circle", "red", "left") == "a red circle moves left"
    assert M.caption_for("square", "blue", "still") == "a blue square stays still"
    assert M.parse_caption(b"a green triangle moves down-right") == ("triangle", "green", "down-right")
    # Held-out combinations leave every shape, colour and motion in training.
    train = set(M.combinations("train"))
    assert not train & set(M.HELD_OUT)
    assert {x[0] for x in train} == set(M.SHAPES) and {x[2] for x in train} == set(M.MOTIONS)


def test_built_records_match(tmp_path):
    res = build.build_dataset("moving_shapes", str(tmp_path), num_train=24, num_validation=8, num_test=8, seed=2)
    assert res.report.written == {"train": 24, "validation": 8, "test": 8} and res.report.num_skipped == 0
    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(res.path)
    for split, n in (("train", 24), ("test", 8)):
        src = b.as_data_source(split)
        assert len(src) == n
        for i in range(n):
            ex = src[i]
            motion = _check_clip(ex, 32, 8)
            assert bool(ex["held_out"]) == (split == "test") == (motion in M.HELD_OUT)
            assert ex["label"] == M.MOTIONS.index(motion[2])
    # Idempotent: a second call reuses the build.
    again = build.build_dataset("moving_shapes", str(tmp_path), num_train=24, num_validation=8, num_test=8, seed=2)
    assert again.existed and again.path == res.path
