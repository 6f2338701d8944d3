"""The demo end to end, shortened (2 training steps per stage, 2 sampling steps), as README.md prints it: every
output is written, the second run reuses the checkpoints, the metrics file has the contract keys, and the README's
sample command reads the trained stage 2 (tests/test_readme.py counts both commands as run here).

`bash launch/demo.sh` runs in a stand-in venv whose python is this interpreter and whose `.installed-test` stamp
is up to date: `launch/setup.sh runtime` must take that as installed (DREAMVIDEO_NO_INSTALL=1 turns an attempt to
install into a failure, never an install)."""

import hashlib
import json
import os
import sys

import imageio.v3 as iio
import pytest

import stand_ins
from dreamvideo_jax import demo
from readme_commands import ROOT, Sandbox, find

SHORT = ["--stage1_steps=2", "--stage2_steps=2", "--sample_steps=2", "--num_images=1", "--noprogress"]


def _test_venv(path) -> str:
    """A venv as `launch/setup.sh test` leaves it: bin/python (here: this interpreter) and the install stamp."""
    os.makedirs(os.path.join(path, "bin"))
    python = os.path.join(path, "bin", "python")
    with open(python, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    os.chmod(python, 0o755)
    pins = ("pyproject.toml", "requirements.txt", "requirements-nodeps.txt", "requirements-test.txt")
    digest = hashlib.sha256(b"".join(open(os.path.join(ROOT, p), "rb").read() for p in pins)).hexdigest()
    with open(os.path.join(path, ".installed-test"), "w") as f:
        f.write(digest + "\n")
    return str(path)


@pytest.mark.slow
def test_readme_demo_commands_shortened(tmp_path):
    sb = Sandbox(tmp_path)
    workdir = sb.path("runs/demo")
    env = dict(os.environ, VENV=_test_venv(tmp_path / "venv"), DREAMVIDEO_NO_INSTALL="1")
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_cache"))  # the second run reuses the programs
    command = find("launch/demo.sh")
    flags = [f"--workdir={workdir}", *SHORT]
    proc = sb.run(command, flags, env=env, timeout=1800)
    assert "DreamVideo: direction accuracy" in proc.stdout, proc.stdout[-2000:]
    for name in ("metrics.json", "contact_sheet.png", "videos/one_image_all_prompts.gif",
                 "videos/one_image_all_prompts.mp4", "videos/two_stage.gif", "videos/two_stage.mp4",
                 "videos/image_guidance_sweep.gif", f"{demo.STAGE2}/checkpoints/2", f"{demo.STAGE1}/checkpoints/2"):
        assert (workdir / name).exists(), name
    m = json.loads((workdir / "metrics.json").read_text())
    for key in ("direction_accuracy", "fff_ssim", "wall_seconds"):
        assert isinstance(m[key], float), key
    assert 0.0 <= m["direction_accuracy"] <= 1.0 and -1.0 <= m["fff_ssim"] <= 1.0
    assert m["dreamvideo"]["num_videos"] == 9 and m["base_t2v_first_frame_replacement"]["num_videos"] == 9
    assert m["two_stage"]["reference_is_last_frame"] is True
    assert list(m["motion_strength"]) == [str(v) for v in demo.MOTION_STRENGTHS]
    assert all(-1.0 <= r["fff_ssim"] <= 1.0 and 0 <= r["tracked"] <= 9 for r in m["motion_strength"].values())
    assert m["motion_strength_spearman"] is None or -1.0 <= m["motion_strength_spearman"] <= 1.0
    assert (workdir / "videos" / "motion_strength_sweep.gif").exists()
    assert (workdir / "videos" / "first_last_and_loop.gif").exists()
    for key in ("last_frame_ssim", "loop_seam"):  # the keyframe scores (None only when no frame is measurable)
        assert m[key] is None or isinstance(m[key], float), key
    assert m["first_last"]["num_videos"] == 1 and "loop_seam_without_loop" in m["loop"]
    assert m["timings"]["stage1_t2v_source"] == "scratch" and m["timings"]["stage2_dreamvideo_source"] == "init_from"

    sb.run(command, flags, env=env, timeout=1800)
    again = json.loads((workdir / "metrics.json").read_text())
    assert again["timings"]["stage1_t2v_source"] == "workdir"
    assert again["timings"]["stage2_dreamvideo_source"] == "workdir"
    assert again["direction_accuracy"] == m["direction_accuracy"]  # same checkpoints, same seeds

    # "Sample from the trained model with any 32x32 image": the README's command on the stage-2 workdir.
    stand_ins.shape_image(sb.work / "my_shape.png")
    sample = find("dreamvideo_jax.sample", config="configs/demo_shapes.py")
    proc = sb.run(sample, ["--config.sample.steps=2", "--noprogress"], env=env, timeout=900)
    assert "step 2, EMA weights" in proc.stdout, proc.stdout
    gif = iio.imread(sb.work / "out.gif", index=None)
    assert gif.shape[:3] == (16, 32, 32)  # two stages of 8 frames
    assert json.loads((sb.work / "out.json").read_text())["prompts"] == ["a red circle moves left",
                                                                         "a red circle moves up"]


def test_a_stage_stopped_on_request_samples_nothing(tmp_path, monkeypatch):
    """SIGTERM / Ctrl-C during training saves a checkpoint and stops the loop; the demo then stops too, instead of
    sampling from a half-trained model and writing metrics as if it were done."""
    import types

    from dreamvideo_jax.training import loop

    calls = []

    def stopped(cfg, workdir):
        calls.append(workdir)
        return types.SimpleNamespace(step=3, source="scratch", preempted=True)

    monkeypatch.setattr(loop, "train_and_evaluate", stopped)
    assert demo.run(str(tmp_path / "demo"), stage1_steps=10, stage2_steps=10) is None
    assert calls == [str(tmp_path / "demo" / demo.STAGE1)]  # stage 2 never starts
    assert not (tmp_path / "demo" / "metrics.json").exists()
