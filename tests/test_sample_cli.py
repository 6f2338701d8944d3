"""`python -m dreamvideo_jax.sample` on the tiny config: outputs that read back, batches from a prompts file,
training workdirs (EMA / raw, latest / chosen step), converted base checkpoints, and one-line errors."""

import json
import os
import subprocess
import sys
import types

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import jax

import stand_ins
from configs import tiny
from dreamvideo_jax.errors import InputError, UserError
from dreamvideo_jax.sampling import runner
from dreamvideo_jax.sampling.pipeline import Sampler
from dreamvideo_jax.system import System

pytestmark = pytest.mark.usefixtures("fast_compile")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


@pytest.fixture(scope="module")
def cfg():
    return tiny.get_config()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("img") / "ref.png"
    Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(path)  # resized and cropped to 16x16
    return str(path)


def _opts(**kw):
    return stand_ins.sample_options(STEPS, **kw)


def _quiet(*a, **k):
    pass


def test_cli_writes_mp4_npz_contact_sheet_and_settings(cfg, image_path, tmp_path):
    out = str(tmp_path / "clip.mp4")
    summary = runner.run(_opts(random_init=True, image=image_path, prompt="a square moves", output=out), cfg,
                      echo=_quiet)
    video = iio.imread(out, index=None, plugin="pyav")
    assert video.shape[:3] == (4, 16, 16)
    sheet = np.asarray(Image.open(tmp_path / "clip.png"))
    assert sheet.shape == (16, 4 * 16 + 3 * 2, 3)
    meta = json.loads((tmp_path / "clip.json").read_text())
    assert meta["frames"] == 4 and meta["prompts"] == ["a square moves"] and meta["seed"] == 0
    assert summary["timings"]["steps"] == STEPS
    npz = str(tmp_path / "clip.npz")
    runner.run(_opts(random_init=True, image=image_path, prompt="a square moves", output=npz), cfg, echo=_quiet)
    with np.load(npz) as z:
        assert z["video"].dtype == np.uint8 and z["video"].shape == (4, 16, 16, 3)
        assert z["latents"].shape == (1, 4, 8, 8, 4)
        # The same request twice: the same video (the mp4 is lossy, the contact sheet is not).
        frames = sheet[:, np.r_[0:16, 18:34, 36:52, 54:70]]
        np.testing.assert_array_equal(np.concatenate(list(z["video"]), axis=1), frames)


def test_cli_end_to_end_in_a_subprocess_two_stages_gif(image_path, tmp_path):
    out, lat = tmp_path / "two.gif", tmp_path / "lat.npz"
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "dreamvideo_jax.sample", "--config=configs/tiny.py", "--random_init",
           f"--image={image_path}", "--prompt=a ball", "--prompt2=the ball stops", "--config.sample.sampler=dpmpp_2m",
           "--config.sample.steps=2", "--config.sample.num_frames=3", "--config.sample.height=32",
           "--config.sample.width=24", f"--output={out}", f"--save_latents={lat}", "--noprogress"]  # 32x24: larger than the 16x16 the tiny config trains at
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          close_fds=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gif = iio.imread(out, index=None)
    assert gif.shape[:3] == (6, 32, 24)
    assert "compile" in proc.stdout and "ssim_to_input" in proc.stdout
    with np.load(lat) as z:
        assert z["latents"].shape == (2, 3, 16, 12, 4) and list(z["prompts"]) == ["a ball", "the ball stops"]
    assert np.asarray(Image.open(tmp_path / "two.png")).shape[0] == 2 * 32 + 2  # one row per stage


def _run_main(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "dreamvideo_jax.sample", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, close_fds=False)


def test_cli_bad_input_exits_with_one_line(image_path, tmp_path):
    proc = _run_main(["--config=configs/tiny.py", "--random_init", f"--image={image_path}",
                      "--config.sample.height=15", f"--output={tmp_path / 'x.mp4'}"], tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --config.sample.height=15: must be a multiple of 2")
    proc = _run_main(["--config=configs/tiny.py", "--config.sample.steps=many", f"--output={tmp_path / 'x.mp4'}"],
                     tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "steps" in proc.stderr


@pytest.mark.parametrize("kw,start", [
    (dict(image="{missing}"), "--image={missing}: no such file"),
    (dict(image="{text}"), "--image={text}: not an image format"),
    (dict(image="{dir}"), "--image={dir}: is a directory"),
    (dict(output="{tmp}/x.avi"), "--output={tmp}/x.avi: unsupported output format"),
    (dict(output=None), "--output=None: an output file is required"),
    (dict(image_guidance=-0.5), "--config.sample.image_guidance=-0.5: guidance scales must be >= 0"),
    (dict(text_guidance=-2.0), "--config.sample.text_guidance=-2.0: guidance scales must be >= 0"),
    (dict(height=15), "--config.sample.height=15: must be a multiple of 2"),
    (dict(width=33), "--config.sample.width=33: must be a multiple of 2"),
    (dict(num_frames=-1), "--config.sample.num_frames=-1:"),
    (dict(steps=0), "--config.sample.steps=0:"),
    (dict(sampler="euler"), "--config.sample.sampler=euler: use one of ddim, dpmpp_2m"),
    (dict(prompts_file="{tmp}/none.txt", prompt=""), "--prompts_file={tmp}/none.txt: no such file"),
    (dict(random_init=False), "--workdir=None: give --workdir or --checkpoint"),
    (dict(random_init=False, workdir="{tmp}"), "--workdir={tmp}: not a checkpoint: expected a training workdir"),
    (dict(random_init=False, checkpoint="{tmp}/nope"), "--checkpoint={tmp}/nope: no such file"),
    (dict(save_latents="{tmp}/l.pt"), "--save_latents={tmp}/l.pt: must be an .npz"),
])  # fmt: skip
def test_cli_bad_inputs_name_the_flag(cfg, image_path, tmp_path, kw, start):
    (tmp_path / "notes.txt").write_text("hello")
    fill = dict(missing=str(tmp_path / "missing.png"), text=str(tmp_path / "notes.txt"), dir=str(tmp_path),
                tmp=str(tmp_path))
    kw = {k: v.format(**fill) if isinstance(v, str) else v for k, v in kw.items()}
    base = dict(random_init=True, image=image_path, prompt="x", output=str(tmp_path / "o.mp4"))
    base.update(kw)
    with pytest.raises(InputError) as e:
        runner.run(_opts(**base), cfg, echo=_quiet)
    assert str(e.value).startswith(start.format(**fill)), str(e.value)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "o.mp4")


def test_empty_prompt_is_text_unconditional(cfg, image_path, tmp_path):
    out = str(tmp_path / "u.npz")
    runner.run(_opts(random_init=True, image=image_path, prompt="", output=out, text_guidance=3.0), cfg, echo=_quiet)
    with np.load(out) as z:
        assert z["video"].shape == (4, 16, 16, 3)


def test_cli_prompts_file_batches_equal_solo_runs(cfg, image_path, tmp_path):
    lines = ["a red square moves left", '{"prompt": "a blue ball", "seed": 42}', "# a comment", "",
             '{"prompt": "", "text_guidance": 2.0}']
    (tmp_path / "prompts.txt").write_text("\n".join(lines))
    out = str(tmp_path / "batch.npz")
    summary = runner.run(_opts(random_init=True, image=image_path, prompts_file=str(tmp_path / "prompts.txt"),
                            output=out, seed=5, batch_size=2), cfg, echo=_quiet)
    assert [os.path.basename(o["output"]) for o in summary["outputs"]] == ["batch_000.npz", "batch_001.npz",
                                                                            "batch_002.npz"]
    assert [o["seed"] for o in summary["outputs"]] == [5, 42, 7]
    sampler = Sampler(cfg, System(cfg).random_params(seed=0))
    img = np.load(tmp_path / "batch_000.npz")["references"][0]
    solo = sampler.generate(img, "a blue ball", steps=STEPS, seed=42)
    with np.load(tmp_path / "batch_001.npz") as z:
        np.testing.assert_array_equal(z["video"], solo[0])


# ------------------------------------------------------------------------------------------ checkpoints


def _workdir(cfg, root):
    from dreamvideo_jax import checkpoints, config_io

    v = System(cfg).random_params(seed=0)
    checkpoints.save_base(str(root / "base"), v, cfg.model)
    (root / "config.json").write_text(config_io.to_json(cfg))
    c = checkpoints.Checkpointer(checkpoints.checkpoint_dir(str(root)), use_async=False)
    rng = np.random.default_rng(1)

    def perturb(tree):
        return jax.tree.map(lambda a: a + 0.5 * rng.standard_normal(a.shape).astype(a.dtype), tree)

    for step in (10, 20):
        train = {"image_conv": v["image_conv"], "retention": v["retention"]}
        state = types.SimpleNamespace(params=perturb(train), ema=perturb(train), opt_state={"count": np.int32(0)},
                                      step=np.int32(step), rng=np.zeros(2, np.uint32))
        c.save(state, None, cfg)
        c.wait()
    c.close()
    return str(root)


def test_cli_workdir_latest_or_chosen_step_ema_or_raw(cfg, image_path, tmp_path):
    wd = _workdir(cfg, tmp_path / "run")
    echoed = []
    videos = {}
    for name, kw in {"latest_ema": {}, "latest_raw": dict(ema=False), "step10": dict(step=10),
                     "ckpt10": dict(checkpoint=os.path.join(wd, "checkpoints", "10"))}.items():
        kw = dict(kw)
        if "checkpoint" not in kw:
            kw["workdir"] = wd
        out = str(tmp_path / f"{name}.npz")
        runner.run(_opts(image=image_path, prompt="a ball", output=out, **kw), None, echo=echoed.append)
        videos[name] = np.load(out)["video"]
    assert any("step 20, EMA weights" in e for e in echoed) and any("step 20, raw weights" in e for e in echoed)
    assert any("step 10, EMA weights" in e for e in echoed)
    np.testing.assert_array_equal(videos["step10"], videos["ckpt10"])
    assert (videos["latest_ema"] != videos["latest_raw"]).any() and (videos["latest_ema"] != videos["step10"]).any()
    with pytest.raises(UserError, match="--step=30"):
        runner.run(_opts(workdir=wd, step=30, image=image_path, output=str(tmp_path / "x.npz")), None, echo=_quiet)


def test_cli_base_checkpoint_is_text_to_video(cfg, image_path, tmp_path):
    from dreamvideo_jax import checkpoints

    v = System(cfg, "t2v").random_params(seed=1)
    base = str(tmp_path / "base")
    checkpoints.save_base(base, v, cfg.model)
    out = str(tmp_path / "t2v.npz")
    summary = runner.run(_opts(checkpoint=base, image=image_path, prompt="a cat", output=out,
                            first_frame_replacement=True), cfg, echo=_quiet)
    assert summary["mode"] == "t2v"
    with np.load(out) as z:
        assert z["video"].shape == (4, 16, 16, 3)
    with pytest.raises(InputError, match="--mode=dreamvideo"):
        runner.run(_opts(checkpoint=base, image=image_path, output=out, mode="dreamvideo"), cfg, echo=_quiet)
    # Without --config a base is read as ModelScope-T2V's: its schedule, eps prediction and open_clip's padding (0).
    loaded, _ = checkpoints.read_config(base)
    assert loaded.data.pad_id == 0 and loaded.train.prediction_type == "eps" and loaded.train.mode == "t2v"
    assert Sampler(loaded, v).system.null_tokens()[0, :3].tolist() == [49406, 49407, 0]


def test_outputs_never_overwrite_inputs_and_prompts_must_be_text(cfg, tmp_path, monkeypatch):
    """The contact sheet of --output=cat.mp4 is cat.png: with --image=cat.png that is refused before anything
    is written. Undecodable prompt bytes and images too large to open safely are one-line errors."""
    import PIL.Image

    cat = tmp_path / "cat.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(cat)
    before = cat.read_bytes()
    with pytest.raises(InputError, match=r"--output=.*cat.png: would overwrite the input --image="):
        runner.run(_opts(random_init=True, image=str(cat), prompt="x", output=str(tmp_path / "cat.mp4")), cfg,
                   echo=_quiet)
    assert cat.read_bytes() == before and not (tmp_path / "cat.mp4").exists()
    with pytest.raises(InputError, match=r"--prompt=.*not valid UTF-8 text"):
        runner.run(_opts(random_init=True, image=str(cat), prompt="a \udcff cat", output=str(tmp_path / "o.mp4")),
                   cfg, echo=_quiet)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # a 16x16 image is then a "bomb" (> 2x the limit)
    with pytest.raises(InputError, match=r"--image=.*cat.png: too large to open safely"):
        runner.run(_opts(random_init=True, image=str(cat), prompt="x", output=str(tmp_path / "o.mp4")), cfg,
                   echo=_quiet)


def test_workdir_without_a_checkpoint_is_refused(cfg, image_path, tmp_path):
    from dreamvideo_jax import checkpoints, config_io

    root = tmp_path / "untrained"
    checkpoints.save_base(str(root / "base"), System(cfg).random_params(seed=0), cfg.model)
    (root / "config.json").write_text(config_io.to_json(cfg))
    with pytest.raises(InputError, match=r"--workdir=.*has no checkpoint yet.*--checkpoint=.*/base"):
        runner.run(_opts(workdir=str(root), image=image_path, output=str(tmp_path / "o.npz")), None, echo=_quiet)


def test_truncated_workdir_files_are_one_line_errors(cfg, image_path, tmp_path):
    from dreamvideo_jax.errors import CheckpointError

    wd = _workdir(cfg, tmp_path / "run")
    out = str(tmp_path / "o.npz")
    config_json = os.path.join(wd, "config.json")
    text = open(config_json).read()
    open(config_json, "w").write(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON") as e:
        runner.run(_opts(workdir=wd, image=image_path, output=out), None, echo=_quiet)
    assert "\n" not in str(e.value)
    open(config_json, "w").write(text)
    for dirpath, _, files in os.walk(os.path.join(wd, "base", "params")):
        for f in files:
            if not f.startswith("_") and f != "manifest.ocdbt":
                path = os.path.join(dirpath, f)
                data = open(path, "rb").read()
                open(path, "wb").write(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"base checkpoint .*/base/params is unreadable") as e:
        runner.run(_opts(workdir=wd, image=image_path, output=out), None, echo=_quiet)
    assert "\n" not in str(e.value) and not os.path.exists(out)
