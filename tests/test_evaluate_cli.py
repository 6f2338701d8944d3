"""`python -m dreamvideo_jax.evaluate` on the tiny config with random weights: the metrics file and its protocol
fields, skipped metrics with reasons, resuming an interrupted run (same numbers as an uninterrupted one),
refusing a state of other settings, and one-line errors."""

import json
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest

from configs import tiny
from dreamvideo_jax.errors import InputError
from dreamvideo_jax.evaluation import runner

pytestmark = pytest.mark.usefixtures("fast_compile")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))  # moving_shapes is built here on first use


def _run(output, data_dir, messages=None, on_batch=None, steps=2, **kw):
    kw.setdefault("num_samples", 4)
    kw.setdefault("batch_size", 2)
    kw.setdefault("dataset", "moving_shapes")
    echo = messages.append if messages is not None else (lambda *_: None)
    opts = runner.Options(random_init=True, output=str(output), data_dir=data_dir, progress=False,
                          overrides={"sample.steps": steps}, **kw)
    return runner.evaluate(opts, tiny.get_config(), on_batch=on_batch, echo=echo)


class _Stop(Exception):
    pass


def test_metrics_protocol_and_resume_after_an_interruption(data_dir, tmp_path):
    full = _run(tmp_path / "full.json", data_dir)
    assert full == json.loads((tmp_path / "full.json").read_text())
    p = full["protocol"]
    assert p["num_samples"] == p["num_videos"] == 4
    assert (p["frames"], p["resolution"], p["stride"]) == (4, [16, 16], 1)
    assert (p["sampler"], p["steps"]) == ("ddim", 2)
    assert (p["image_guidance"], p["text_guidance"]) == (1.5, 7.5)
    assert (p["dataset"], p["split"]) == ("moving_shapes", "validation")
    assert "checkpoint_step" in p and p["weights"].startswith("random weights")
    assert p["real_frames"] == 4 and p["real_clips_padded"] == 0 and "real_clips_stride_reduced" not in p
    m = full["metrics"]
    assert {"fff_ssim", "direction_accuracy", "identity_retention", "colour_accuracy"} <= set(m)
    assert "I3D needs >= 9" in full["skipped"]["fvd"]
    assert {"is", "fff_clip", "clip_sim"} <= set(full["skipped"]) and "fvd" not in m

    # Interrupted after the first batch of 2 clips: the state holds them, and a rerun finishes the other 2.
    out = tmp_path / "resumed.json"
    seen = []

    def stop(done):
        seen.append(done)
        raise _Stop

    with pytest.raises(_Stop):
        _run(out, data_dir, on_batch=stop)
    assert seen == [2] and not out.exists()
    state_npz, state_json = runner.state_paths(str(out))
    assert os.path.exists(state_npz) and os.path.exists(state_json)
    messages, seen = [], []
    resumed = _run(out, data_dir, messages, on_batch=seen.append)
    assert seen == [4] and any("resuming after 2 of 4" in x for x in messages)
    assert resumed["protocol"] == full["protocol"]
    assert resumed["skipped"] == full["skipped"]
    for k, v in full["metrics"].items():
        np.testing.assert_allclose(resumed["metrics"][k], v, rtol=1e-6, err_msg=k)

    # A finished evaluation rerun: the numbers again, without loading weights or generating.
    messages = []
    again = _run(out, data_dir, messages)
    assert again == resumed and not any(x.startswith("weights:") for x in messages)

    # Other settings than the saved state's: refused before any weights are loaded.
    with pytest.raises(InputError, match="other settings.*steps"):
        _run(out, data_dir, steps=3)
    with pytest.raises(InputError, match="already holds 4 clips"):
        _run(out, data_dir, num_samples=2)


def test_bad_inputs(data_dir, tmp_path):
    with pytest.raises(InputError, match="--dataset=kinetics"):
        _run(tmp_path / "x.json", data_dir, dataset="kinetics")
    with pytest.raises(InputError, match="--output"):
        _run(tmp_path / "x.txt", data_dir)
    with pytest.raises(InputError, match="--dataset=ucf101: .*--config_name=ucf101"):  # no such build in the data dir
        _run(tmp_path / "x.json", data_dir, dataset="ucf101")


def test_cli_missing_workdir_is_a_one_line_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "dreamvideo_jax.evaluate", f"--workdir={tmp_path}/nowhere",
                        "--dataset=moving_shapes", "--num_samples=2", f"--output={tmp_path}/m.json"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines[-1] == f"error: --workdir={tmp_path}/nowhere: no such file or directory", r.stderr
    assert "Traceback" not in r.stderr


# -- the runner's own logic, without a model: "generated" clips repeat the conditioning image --------------------


class _FakeSampler:
    mode = "dreamvideo"

    def __init__(self, *args, **kwargs):
        pass

    def generate(self, images, captions, *, num_frames, height, width, **kwargs):
        return np.repeat(np.asarray(images)[:, None], num_frames, axis=1)


@pytest.fixture
def no_model(monkeypatch):
    from dreamvideo_jax.sampling import pipeline as sampling_pipeline
    from dreamvideo_jax.sampling import runner as sampling_runner

    fake = lambda config, **kw: types.SimpleNamespace(config=config, params=None, source="fake weights", step=None,
                                                      tokenizer_dir=None)  # fmt: skip
    monkeypatch.setattr(sampling_runner, "load_weights", fake)
    monkeypatch.setattr(sampling_pipeline, "Sampler", _FakeSampler)


def _quick(output, data_dir, stored_frames=8, stride=1, messages=None, on_batch=None, **kw):
    """Evaluates 4 generated frames of 16x16 against a small moving-shapes build of `stored_frames` frames."""
    config = tiny.get_config()
    d = config.data
    d.build.frames, d.build.num_train, d.build.num_validation, d.build.num_test = stored_frames, 4, 6, 0
    d.frame_stride = stride
    kw.setdefault("num_samples", 5)
    opts = runner.Options(random_init=True, output=str(output), data_dir=str(data_dir), progress=False,
                          dataset="moving_shapes", batch_size=2, shapes=False, **kw)  # fmt: skip
    echo = messages.append if messages is not None else (lambda *_: None)
    return runner.evaluate(opts, config, on_batch=on_batch, echo=echo)


def test_padded_real_clips_are_counted_and_warned(tmp_path, no_model):
    """Real clips of 3 frames evaluated at 4 frames, stride 2: padded with their last frame (and read at stride 1);
    the protocol counts them, the notes and the output warn, and a resumed run keeps the counts."""
    messages = []
    out = _quick(tmp_path / "m.json", tmp_path / "data", stored_frames=3, stride=2, messages=messages)
    p = out["protocol"]
    assert (p["real_frames"], p["real_clips_padded"], p["real_frames_padded_max"]) == (4, 5, 1)
    assert p["real_clips_stride_reduced"] == 5
    padded = [n for n in out["notes"] if n.startswith("WARNING: 5 of 5 real clips hold fewer than the 4 frames")]
    assert len(padded) == 1 and "padded by repeating their last frame" in padded[0] and "FVD" in padded[0]
    assert any(n.startswith("WARNING: 5 of 5 real clips are shorter than 4 frames at stride 2") for n in out["notes"])
    assert padded[0] in messages
    with pytest.raises(_Stop):
        _quick(tmp_path / "r.json", tmp_path / "data", stored_frames=3, stride=2, on_batch=_raise)
    resumed = _quick(tmp_path / "r.json", tmp_path / "data", stored_frames=3, stride=2)
    assert resumed["protocol"] == p and resumed["notes"] == out["notes"]


def _raise(done):
    raise _Stop


def test_unreadable_saved_state_is_a_one_line_error(tmp_path, no_model):
    out = tmp_path / "m.json"
    with pytest.raises(_Stop):
        _quick(out, tmp_path / "data", on_batch=_raise)
    state_npz, state_json = runner.state_paths(str(out))
    raw = open(state_npz, "rb").read()
    open(state_npz, "wb").write(raw[: len(raw) // 2])  # truncated
    with pytest.raises(InputError) as e:
        _quick(out, tmp_path / "data")
    msg = str(e.value)
    assert msg.startswith(f"--output={out}: the saved evaluation state {state_npz} is unreadable (BadZipFile")
    assert msg.endswith("rerun with --restart to discard it and start afresh") and "\n" not in msg
    open(state_json, "w").write('{"settings": {"version": 1, "data')  # cut short
    with pytest.raises(InputError, match=f"state {state_json} is unreadable \\(JSONDecodeError.*--restart"):
        _quick(out, tmp_path / "data")
    assert _quick(out, tmp_path / "data", restart=True)["protocol"]["num_videos"] == 5


class _Marker:
    """Unpickling this creates a file: proof that a weights file is never unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_metric_weights_given_must_exist_and_load(tmp_path, no_model):
    data = tmp_path / "data"
    with pytest.raises(InputError, match=f"^--c3d_weights={tmp_path}/missing.npz: no such file"):
        _quick(tmp_path / "m.json", data, c3d_weights=str(tmp_path / "missing.npz"))
    with pytest.raises(InputError, match="^--clip_model=typo: no such folder"):
        _quick(tmp_path / "m.json", data, clip_model="typo")
    with pytest.raises(InputError, match=f"^--clip_model={tmp_path}: no config.json in this folder"):
        _quick(tmp_path / "m.json", data, clip_model=str(tmp_path))
    marker = tmp_path / "unpickled"
    pickled = tmp_path / "c3d_pickle.npz"
    pickled.write_bytes(pickle.dumps({"conv1a.weight": _Marker(str(marker))}))
    objects = tmp_path / "c3d_objects.npz"
    np.savez(objects, mean=np.zeros((3, 16, 112, 112), np.float32), extra=np.array([_Marker(str(marker))], object))
    for path in (pickled, objects):
        with pytest.raises(InputError) as e:
            _quick(tmp_path / "m.json", data, c3d_weights=str(path))
        assert str(e.value).startswith(f"--c3d_weights={path}: holds pickled Python objects, which are never loaded")
        assert "\n" not in str(e.value)
    assert not marker.exists()
    truncated = tmp_path / "c3d_truncated.npz"
    truncated.write_bytes(objects.read_bytes()[:100])
    with pytest.raises(InputError, match=f"^--c3d_weights={truncated}: cannot be read as .npz / .safetensors"):
        _quick(tmp_path / "m.json", data, c3d_weights=str(truncated))
    assert not (tmp_path / "m.json").exists()
