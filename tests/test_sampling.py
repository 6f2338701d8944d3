"""Sampling pipeline on the tiny config with random weights: guidance on the real model, determinism, compile
once, batch/solo and 1-vs-8-device equality, chaining, text-to-video with first-frame replacement, inputs and
outputs."""

import contextlib
import logging
import os

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from configs import tiny
from dreamvideo_jax.diffusion import samplers as SM
from dreamvideo_jax.models import build as mb
from dreamvideo_jax.sampling import config as sample_config
from dreamvideo_jax.sampling import inputs as I
from dreamvideo_jax.sampling import outputs
from dreamvideo_jax.sampling.pipeline import GuidedModel, Sampler
from dreamvideo_jax.system import System

pytestmark = pytest.mark.usefixtures("fast_compile")

STEPS = 3


@pytest.fixture(scope="module")
def cfg():
    return tiny.get_config()


@pytest.fixture(scope="module")
def variables(cfg):
    return System(cfg).random_params(seed=0)


@pytest.fixture(scope="module")
def sampler(cfg, variables):
    return Sampler(cfg, variables)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return (rng.random((16, 16, 3)) * 255).astype(np.uint8)


@contextlib.contextmanager
def count_compilations():
    events = []

    def listener(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ----------------------------------------------------------------------------------------------- guidance


def _context(cfg, variables, n):
    rng = np.random.default_rng(1)
    d = mb.text_config(cfg.model).width
    return jnp.asarray(rng.standard_normal((n, 77, d)), jnp.float32)


def test_double_guidance_on_the_model_equals_three_separate_forwards(cfg, variables, sampler):
    params = variables
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 4, 8, 8, 4)), jnp.float32)
    t = jnp.array([500], jnp.int32)
    text, null = _context(cfg, variables, 2)[:1], _context(cfg, variables, 2)[1]
    img = jnp.asarray(rng.uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    model_fn = jax.jit(GuidedModel(sampler.system))
    u, i, f = SM.split_guidance_output(model_fn(params, *SM.guidance_inputs(x, t, text, null, img)))

    def alone(context, image):  # one branch by itself (three copies of it, so one compiled shape serves all)
        rep = lambda a: jnp.repeat(a, 3, axis=0)  # noqa: E731
        return model_fn(params, rep(x), rep(t), rep(context), rep(image))[:1]

    u_ref, i_ref, f_ref = alone(null[None], jnp.zeros_like(img)), alone(null[None], img), alone(text, img)
    for a, b in ((u, u_ref), (i, i_ref), (f, f_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(i_ref - u_ref).max()) > 1e-3 and float(jnp.abs(f_ref - i_ref).max()) > 1e-3
    s_i, s_t = 1.7, 6.0
    formula = u_ref + s_i * (i_ref - u_ref) + s_t * (f_ref - i_ref)
    np.testing.assert_allclose(SM.double_guidance(u, i, f, s_i, s_t), formula, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(SM.double_guidance(u, i, f, 1.0, 1.0), f_ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ determinism, compiles


def test_same_seed_same_video_and_knobs_never_recompile(sampler, image):
    prompts = ["a red square moves right", ""]
    a = sampler.generate(image, prompts, steps=STEPS, seed=3)
    assert a.shape == (2, 4, 16, 16, 3) and a.dtype == np.uint8
    with count_compilations() as events:
        b = sampler.generate(image, prompts, steps=STEPS, seed=3)
        c = sampler.generate(image, prompts, steps=STEPS + 2, seed=4, image_guidance=[0.5, 2.0],
                             text_guidance=9.0, eta=0.7)
        d = sampler.generate(image, prompts[::-1], steps=1, seed=3, image_guidance=1.0, text_guidance=1.0)
        e = sampler.generate(image, prompts, steps=STEPS, seed=3, negative_prompt="blurry, static")
    assert events == [], f"{len(events)} XLA compilations after the first call"
    assert sampler.timings.compiles == 0 and sampler.timings.compile_s == 0.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 0
    assert d.shape == a.shape
    assert np.abs(a.astype(int) - e.astype(int)).max() > 0
    np.testing.assert_array_equal(a, sampler.generate(image, prompts, steps=STEPS, seed=3, negative_prompt=""))


def test_each_sample_equals_its_solo_run_on_one_device_and_the_batch_on_eight(cfg, variables, sampler, image):
    prompts, seeds = ["a blue circle falls", "a green square"], [7, 11]
    kw = dict(steps=STEPS, seed=seeds, text_guidance=[5.0, 8.0], image_guidance=[1.2, 2.0], eta=0.5)
    batch = sampler.generate(image, prompts, **kw)  # automatic: 2 samples on 2 of the 8 devices
    devices = jax.devices()
    assert len(devices) == 8
    on8 = Sampler(cfg, variables, mesh=Mesh(np.asarray(devices), ("data",)))  # padded to 8, one per device
    np.testing.assert_array_equal(on8.generate(image, prompts, **kw), batch)
    on1 = Sampler(cfg, variables, mesh=Mesh(np.asarray(devices[:1]), ("data",)))
    for b in range(2):
        solo = on1.generate(image, prompts[b], steps=STEPS, seed=seeds[b], text_guidance=kw["text_guidance"][b],
                            image_guidance=kw["image_guidance"][b], eta=0.5)
        np.testing.assert_array_equal(solo[0], batch[b])

def test_scan_loop_equals_python_loop(cfg, variables, sampler, image):
    c = tiny.get_config()
    c.sample = sample_config.defaults()
    c.sample.loop = "scan"
    scan = Sampler(c, variables)
    kw = dict(steps=STEPS, seed=[3, 4], eta=0.5, sampler="ddim")
    np.testing.assert_allclose(scan.sample_latents(image, ["a", "b"], **kw),
                               sampler.sample_latents(image, ["a", "b"], **kw), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- chaining


def test_chain_stage_reference_is_exactly_the_last_frame(sampler, image):
    seen = []
    res = sampler.generate_chain(image, ["a ball rolls", "the ball stops", ["x", "y"]], steps=STEPS, seed=[3, 5],
                                 on_stage=lambda k, lat, vid: seen.append((k, vid is None)))
    assert [s.shape for s in res.stages] == [(2, 4, 16, 16, 3)] * 3
    assert res.video.shape == (2, 12, 16, 16, 3) and res.references.shape == (2, 3, 16, 16, 3)
    np.testing.assert_array_equal(res.references[:, 0], np.stack([image, image]))
    for k in (1, 2):
        np.testing.assert_array_equal(res.references[:, k], res.stages[k - 1][:, -1])
    np.testing.assert_array_equal(res.video, np.concatenate(res.stages, axis=1))
    assert seen == [(0, True), (0, False), (1, True), (1, False), (2, True), (2, False)]
    assert res.prompts[2] == ["x", "y"] and res.prompts[0] == ["a ball rolls"] * 2
    # Stage 0 is the plain clip of the same seed; later stages draw fresh noise.
    plain = sampler.generate(image, ["a ball rolls"] * 2, steps=STEPS, seed=[3, 5])
    np.testing.assert_array_equal(res.stages[0], plain)
    assert res.drift["ssim_to_input"].shape == (2, 3) and res.drift["mean_rgb_shift"].shape == (2, 3, 3)
    np.testing.assert_allclose(res.drift["ssim_to_input"][:, 0], res.drift["ssim_to_reference"][:, 0])
    assert res.drift["seam"].shape == (2, 2) and res.drift["loop_seam"].shape == (2,)
    dropped = sampler.generate_chain(image, ["a", "b"], steps=STEPS, seed=[3, 5], drop_repeated_frame=True)
    assert dropped.video.shape == (2, 7, 16, 16, 3)


def test_text_to_video_two_branches_and_first_frame_replacement(cfg, image):
    v = System(cfg, "t2v").random_params(seed=1)
    s = Sampler(cfg, v, mode="t2v")
    assert s.mode == "t2v"
    # The model runs the unconditional and text rows only; the image-only branch is the unconditional one.
    params = v
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 4, 8, 8, 4)), jnp.float32)
    t = jnp.array([700], jnp.int32)
    text, null = _context(cfg, v, 2)[:1], _context(cfg, v, 2)[1]
    branches = jax.jit(GuidedModel(s.system))(params, *SM.guidance_inputs(x, t, text, null, jnp.zeros((1, 1))))
    u, i, f = SM.split_guidance_output(branches)
    unet = jax.jit(lambda p, x, t, c: s.system.model.apply({"params": {"unet": p["unet"]}}, x, t, c,
                                                            method="unet_only"))
    ref = unet(params, jnp.repeat(x, 2, 0), jnp.repeat(t, 2, 0), jnp.concatenate([null[None], text]))
    np.testing.assert_allclose(u[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(i, u)
    np.testing.assert_allclose(f[0], ref[1], rtol=1e-5, atol=1e-5)

    other = np.ascontiguousarray(image[::-1])
    plain = s.sample_latents(image, "a cat", steps=STEPS, seed=2)
    np.testing.assert_array_equal(plain, s.sample_latents(other, "a cat", steps=STEPS, seed=2))  # image ignored
    lat = s.sample_latents(image, "a cat", steps=STEPS, seed=2, first_frame_replacement=True)
    ref = s.system.image_latent(v, jnp.asarray(I.to_model_range(image[None])))
    np.testing.assert_allclose(lat[0, 0], ref[0], atol=1e-5)
    assert np.abs(lat[0, 1:] - plain[0, 1:]).max() > 1e-4  # the pinned frame steers the others
    with pytest.raises(I.InputError, match="--image"):
        s.generate(None, "a cat", steps=STEPS, first_frame_replacement=True)


def test_motion_strength_starts_from_the_noised_still_video(cfg, variables, sampler, image):
    """motion_strength=1 is the plain sampler; below 1 the run starts from the reference latent in every frame,
    noised to the level of the first remaining step (the same noise), and runs only the remaining steps."""
    steps = 10
    plain = sampler.sample_latents(image, "a ball rolls", steps=steps, seed=3)
    np.testing.assert_array_equal(sampler.sample_latents(image, "a ball rolls", steps=steps, seed=3,
                                                         motion_strength=1.0), plain)
    assert [I.start_step(steps, s) for s in (1.0, 0.75, 0.5, 0.04, 0.0)] == [0, 2, 5, 9, 9]
    ref = sampler.system.image_latent(variables, jnp.asarray(I.to_model_range(image[None])))
    still = np.broadcast_to(np.asarray(ref)[:, None], plain.shape)
    motion = []
    for strength in (1.0, 0.5, 0.0):
        lat = sampler.sample_latents(image, "a ball rolls", steps=steps, seed=3, motion_strength=strength)
        assert sampler.timings.steps == max(1, round(strength * steps))
        motion.append(float(np.abs(np.diff(lat, axis=1)).mean()))
        if strength == 0.0:
            # One step from the still video at the lowest level: the start is almost clean, so little changes.
            assert np.abs(lat - still).mean() < 0.2 * np.abs(plain - still).mean()
    assert motion[0] > motion[1] > motion[2], motion
    # The start itself: prepare() mixes the still video and the run's noise with the schedule's own scales.
    from dreamvideo_jax.sampling.pipeline import prepare

    seeds, stage, imgs = jnp.asarray([3], jnp.uint32), jnp.int32(0), jnp.asarray(image[None])
    shape = plain.shape
    noise = prepare(sampler.system, variables["vae"], seeds, stage, imgs, shape=shape, need_latent=True)[0]
    scales = jnp.asarray([0.6, 0.8], jnp.float32)
    start = prepare(sampler.system, variables["vae"], seeds, stage, imgs, scales, shape=shape,
                    need_latent=True, from_still=True)[0]
    np.testing.assert_allclose(start, 0.6 * still + 0.8 * np.asarray(noise), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("kw,flag", [
    (dict(height=15), "--height=15"), (dict(width=9), "--width=9"), (dict(num_frames=0), "--num_frames=0"),
    (dict(image_guidance=-1.0), "--image_guidance=-1.0"), (dict(text_guidance=float("nan")), "--text_guidance"),
    (dict(steps=0), "--steps=0"), (dict(steps=1000), "--steps=1000"), (dict(sampler="euler"), "--sampler=euler"),
    (dict(sampler="dpmpp_2m", eta=0.5), "--eta=0.5"), (dict(seed=-1), "--seed=-1"),
    (dict(motion_strength=1.5), "--motion_strength=1.5"), (dict(motion_strength="x"), "--motion_strength=x"),
])  # fmt: skip
def test_bad_arguments_name_the_argument(sampler, image, kw, flag):
    with pytest.raises(I.InputError) as e:
        sampler.generate(image, "x", **kw)
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)


def test_long_prompt_is_truncated_with_a_warning(sampler, caplog):
    with caplog.at_level(logging.WARNING):
        ids = sampler.tokens(["word " * 100, "short"])
    assert ids.shape == (2, 77)
    assert any("truncated" in r.getMessage() for r in caplog.records)
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 1


def test_sample_config_defaults_and_unknown_keys(cfg):
    s = sample_config.resolve(cfg)
    assert s.sampler == "ddim" and s.steps == 50 and s.timestep_spacing == "leading" and s.steps_offset == 1
    c = tiny.get_config()
    c.sample = sample_config.defaults()
    c.sample.text_guidance = 9.0
    assert sample_config.resolve(c).text_guidance == 9.0
    c.sample = {"text_guidence": 1.0}
    with pytest.raises(ValueError, match="text_guidence"):
        sample_config.resolve(c)


# ----------------------------------------------------------------------------------------- images, outputs


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_images_of_any_mode_and_size(tmp_path, caplog):
    rng = np.random.default_rng(0)
    rgb = (rng.random((30, 50, 3)) * 255).astype(np.uint8)
    rgba = np.concatenate([rgb, np.zeros((30, 50, 1), np.uint8)], -1)  # fully transparent -> white
    cases = {
        "rgb.jpg": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(rgba, "RGBA"),
        "gray.png": Image.fromarray(rgb[..., 0]),
        "palette.gif": Image.fromarray(rgb).convert("P"),
        "gray16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "bw.bmp": Image.fromarray(rgb[..., 0] > 128),
    }
    with caplog.at_level(logging.INFO):
        for name, img in cases.items():
            out = I.load_image(_save(img, tmp_path / name), 16, 24)
            assert out.shape == (16, 24, 3) and out.dtype == np.uint8, name
    white = I.load_image(str(tmp_path / "rgba.png"), 16, 24)
    assert (white == 255).all()
    assert any("resized" in r.getMessage() and "centre-cropped" in r.getMessage() for r in caplog.records)
    # Animated: the first frame.
    frames = [Image.fromarray(np.full((20, 20, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert abs(int(I.load_image(str(tmp_path / "anim.gif"), 20, 20).mean()) - 10) <= 2
    # Same size: untouched.
    np.testing.assert_array_equal(I.load_image(_save(Image.fromarray(rgb), tmp_path / "same.png"), 30, 50), rgb)


def test_bad_image_files_name_the_flag(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    good = _save(Image.fromarray(noise), tmp_path / "ok.png")
    with open(good, "rb") as f:
        data = f.read()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for path, reason in [(tmp_path / "missing.png", "no such file"), (tmp_path, "directory"),
                         (tmp_path / "notes.txt", "not an image format"), (tmp_path / "cut.png", "unreadable")]:
        with pytest.raises(I.InputError) as e:
            I.load_image(str(path), 16, 16)
        assert str(e.value).startswith(f"--image={path}") and reason in str(e.value)


def test_video_outputs_read_back(tmp_path):
    rng = np.random.default_rng(0)
    video = (rng.random((5, 16, 24, 3)) * 255).astype(np.uint8)
    video[2] = video[1]  # identical consecutive frames must not be merged
    for ext in ("mp4", "gif"):
        path = outputs.write_video(str(tmp_path / f"v.{ext}"), video, fps=8)
        back = iio.imread(path, index=None, plugin="pyav" if ext == "mp4" else None)
        assert back.shape[:3] == (5, 16, 24), ext
        assert oct(os.stat(path).st_mode & 0o777) != "0o600"
    odd = outputs.write_video(str(tmp_path / "odd.mp4"), video[:, :15, :23])
    assert iio.imread(odd, index=None, plugin="pyav").shape[:3] == (5, 16, 24)  # padded to even for yuv420p
    outputs.write_video(str(tmp_path / "v.npz"), video, fps=8, prompts=np.asarray(["a"]))
    with np.load(tmp_path / "v.npz") as z:
        np.testing.assert_array_equal(z["video"], video)
        assert z["video"].dtype == np.uint8 and str(z["prompts"][0]) == "a"
    sheet = outputs.contact_sheet([video, video[:3]], gap=2)
    assert sheet.shape == (2 * 16 + 2, 5 * 24 + 4 * 2, 3)
    np.testing.assert_array_equal(sheet[18:34, 26:50], video[1])
    # Labels: a column on the left, one line of dark text per row; the frames are unchanged beside it.
    labelled = outputs.contact_sheet([video, video[:3]], gap=2, labels=["stage 1: a ball rolls", "x" * 500])
    extra = labelled.shape[1] - sheet.shape[1]
    assert labelled.shape[0] == sheet.shape[0] and 24 < extra <= outputs.LABEL_MAX_WIDTH + 2
    np.testing.assert_array_equal(labelled[:, extra:], sheet)
    for top in (0, 18):  # each row's band of the label column has text in it
        assert (labelled[top:top + 16, :extra - 2] < 100).any()
    with pytest.raises(ValueError, match="1 labels for 2 rows"):
        outputs.contact_sheet([video, video], labels=["one"])
