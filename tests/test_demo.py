"""The demo end to end, shortened (2 training steps per stage, 2 sampling steps): every output is written, the
second run reuses the checkpoints, and the metrics file has the contract keys."""

import json
import os

import pytest

from dreamvideo_jax import demo


@pytest.mark.slow
def test_short_demo_writes_every_output_and_reuses_checkpoints(tmp_path):
    workdir = str(tmp_path / "demo")
    kw = dict(stage1_steps=2, stage2_steps=2, sample_steps=2, num_images=1, progress=False)
    m = demo.run(workdir, "configs/demo_shapes.py", **kw)
    for name in ("metrics.json", "contact_sheet.png", "videos/one_image_all_prompts.gif",
                 "videos/one_image_all_prompts.mp4", "videos/two_stage.gif", "videos/two_stage.mp4",
                 "videos/image_guidance_sweep.gif", f"{demo.STAGE2}/checkpoints/2", f"{demo.STAGE1}/checkpoints/2"):
        assert os.path.exists(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "metrics.json")) as f:
        stored = json.load(f)
    for key in ("direction_accuracy", "fff_ssim", "wall_seconds"):
        assert isinstance(stored[key], float), key
    assert 0.0 <= stored["direction_accuracy"] <= 1.0 and -1.0 <= stored["fff_ssim"] <= 1.0
    assert stored["dreamvideo"]["num_videos"] == 9 and stored["base_t2v_first_frame_replacement"]["num_videos"] == 9
    assert stored["two_stage"]["reference_is_last_frame"] is True
    assert m["timings"]["stage1_t2v_source"] == "scratch" and m["timings"]["stage2_dreamvideo_source"] == "init_from"

    again = demo.run(workdir, "configs/demo_shapes.py", **kw)
    assert again["timings"]["stage1_t2v_source"] == "workdir"
    assert again["timings"]["stage2_dreamvideo_source"] == "workdir"
    assert again["direction_accuracy"] == m["direction_accuracy"]  # same checkpoints, same seeds
