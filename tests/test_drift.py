"""The chain report's seam and drift scores on synthetic chains: low on a smooth chain, flagged on an injected
jump, and an injected colour or contrast change shows in the stage where it happens."""

import numpy as np
import pytest

from dreamvideo_jax.sampling import drift

H = W = 24


def _bar(position: float) -> np.ndarray:
    """A frame: a soft vertical bar at `position` (pixels) on a textured background."""
    x = np.arange(W)[None, :]
    y = np.arange(H)[:, None]
    bar = 150.0 * np.exp(-0.5 * ((x - position) / 2.0) ** 2)
    background = 40.0 + 20.0 * np.sin(y / 3.0) + 0 * x
    grey = np.clip(background + bar, 0, 255)
    return np.stack([grey, 0.8 * grey, 0.6 * grey], axis=-1).round().astype(np.uint8)


def _chain(stages=3, frames=6, speed=1.0):
    """`stages` clips of a bar moving right at constant speed; each clip starts at the previous clip's last
    frame, as a chain does: ((1, S, H, W, 3) references, [S x (1, F, H, W, 3)] stages)."""
    clips, pos = [], 2.0
    for _ in range(stages):
        clips.append(np.stack([_bar(pos + speed * t) for t in range(frames)])[None])
        pos += speed * (frames - 1)
    refs = np.stack([clips[0][:, 0]] + [c[:, -1] for c in clips[:-1]], axis=1)
    return refs, clips


def test_smooth_chain_scores_low():
    refs, clips = _chain()
    d = drift.chain_drift(refs[:, 0], refs, clips)
    assert d["seam"].shape == (1, 2) and d["loop_seam"].shape == (1,) and d["contrast_ratio"].shape == (1, 3)
    # Joined in full, the boundary re-shows the previous last frame: a pause, no jump.
    assert np.all(d["seam"] < 0.5), d["seam"]
    # Dropping the repeated frame: the boundary step is one ordinary frame step.
    video = np.concatenate([clips[0]] + [c[:, 1:] for c in clips[1:]], axis=1)
    d = drift.chain_drift(refs[:, 0], refs, clips, video, starts=[6, 11])
    np.testing.assert_allclose(d["seam"], 1.0, atol=0.15)
    assert np.all(d["seam"] < drift.SEAM_FLAG)
    np.testing.assert_allclose(d["color_shift"][:, 0], 0.0, atol=1e-9)  # stage 1 starts at the input image
    assert np.all(np.abs(d["contrast_ratio"] - 1.0) < 0.1)
    # The bar has moved across the frame by the end: the loop back to the start is a jump.
    assert d["loop_seam"][0] > drift.SEAM_FLAG


def test_injected_seam_is_flagged_at_its_boundary():
    refs, clips = _chain()
    jumped = np.stack([_bar(p) for p in np.arange(6) + 2.0 + 10 + 8.0])[None]  # stage 3 starts 8 px ahead
    clips = [clips[0], clips[1], jumped]
    d = drift.chain_drift(refs[:, 0], refs, clips)
    assert d["seam"][0, 0] < drift.SEAM_FLAG < d["seam"][0, 1], d["seam"]
    table = drift.format_drift(d)
    assert table.splitlines()[3].split()[5].endswith("!") and "!" not in table.splitlines()[2]


def test_injected_colour_and_contrast_drift_show_in_their_stage():
    refs, clips = _chain()
    before = drift.chain_drift(refs[:, 0], refs, clips)  # the bar's own movement shifts the means a little
    warm = clips[1].astype(np.int16)
    warm[..., 0] += 30  # stage 2 turns redder
    clips[1] = np.clip(warm, 0, 255).astype(np.uint8)
    flat = clips[2].astype(np.float64)
    clips[2] = (flat.mean() + 0.5 * (flat - flat.mean())).round().astype(np.uint8)  # stage 3 loses contrast
    d = drift.chain_drift(refs[:, 0], refs, clips)
    shift = d["mean_rgb_shift"] - before["mean_rgb_shift"]
    assert shift[0, 1, 0] == pytest.approx(30, abs=0.5) and np.all(np.abs(shift[0, 1, 1:]) < 1e-9)
    assert d["color_shift"][0, 1] > before["color_shift"][0, 1] + 25 and d["color_shift"][0, 0] == 0
    assert d["contrast_ratio"][0, 2] / before["contrast_ratio"][0, 2] == pytest.approx(0.5, abs=0.03)
    assert d["contrast_ratio"][0, 1] == pytest.approx(before["contrast_ratio"][0, 1], abs=0.02)


def test_still_clips_and_bad_starts():
    still = [np.repeat(_bar(5.0)[None, None], 4, axis=1)] * 2
    refs = np.stack([still[0][:, 0]] * 2, axis=1)
    d = drift.chain_drift(refs[:, 0], refs, still)
    assert np.isnan(d["seam"][0, 0]) and np.isnan(d["loop_seam"][0])  # nothing moves anywhere
    moved = [still[0], np.repeat(_bar(12.0)[None, None], 4, axis=1)]
    assert np.isinf(drift.chain_drift(refs[:, 0], refs, moved)["seam"][0, 0])  # a jump in a still chain
    with pytest.raises(ValueError, match=r"stage starts \[9\] are outside a video of 8 frames"):
        drift.seam_scores(np.concatenate(still, axis=1)[0], [9])
