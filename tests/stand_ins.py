"""Tiny stand-ins for what the commands read, shared by the tests: video files and folders (with captions.csv,
or UCF-101's class layout), images, base checkpoints, the environment of the CLI subprocesses, and the sample command's options."""

from __future__ import annotations

import os
import pathlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encode_video(path, frames: np.ndarray, codec: str, pix_fmt: str, in_fmt: str = "rgb24", rate: int = 10) -> None:
    """Writes `frames` (F, H, W[, C]) uint8 with PyAV."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format=in_fmt)):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def video_folder(d, names=("a.mkv",), frames: int = 8, rows=None, seed: int = 0) -> pathlib.Path:
    """A folder of tiny lossless clips (16x16, `frames` frames) and a caption file (default: one row per clip)."""
    d = pathlib.Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        encode_video(d / name, rng.integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8), "ffv1", "bgr0")
    rows = rows if rows is not None else [f"{n},clip {n}" for n in names]
    (d / "captions.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    return d


def ucf101_folder(d, classes=("ApplyEyeMakeup", "Basketball"), frames: int = 8, seed: int = 1) -> pathlib.Path:
    """UCF-101's layout: CLASS/v_CLASS_g01_c01.avi, one tiny lossless clip per class, no caption file."""
    d = pathlib.Path(d)
    rng = np.random.default_rng(seed)
    for cls in classes:
        (d / cls).mkdir(parents=True, exist_ok=True)
        encode_video(d / cls / f"v_{cls}_g01_c01.avi", rng.integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8),
                     "ffv1", "bgr0")
    return d


def image(path, height: int, width: int, seed: int = 0) -> str:
    """A random RGB image (format from the suffix)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def shape_image(path, size: int = 32) -> str:
    """A red disc on grey, like the moving-shapes demo's clips (`configs/demo_shapes.py`: 32x32)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (128, 128, 128))
    r = size // 6
    ImageDraw.Draw(img).ellipse((size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r), fill=(220, 30, 30))
    img.save(path)
    return str(path)


def base_checkpoint(path, config, mode: str = "t2v") -> str:
    """A base checkpoint (what `python -m dreamvideo_jax.convert` writes) of `config`'s architecture, random
    weights drawn on the host (no compilation)."""
    from dreamvideo_jax import checkpoints
    from dreamvideo_jax.system import System

    checkpoints.save_base(str(path), System(config, mode).random_params(seed=0), config.model)
    return str(path)


def cli_env(cache_dir, devices: int = 1) -> dict:
    """Environment of a CLI subprocess: this checkout first on PYTHONPATH, `devices` CPU devices, the suite's
    XLA flags, XLA's high-level optimisations off, and a persistent compilation cache that keeps every program:
    the suite's ($JAX_COMPILATION_CACHE_DIR, which launch/test.sh sets for one run) when set, else `cache_dir`.
    Subprocesses with the same environment share compiled programs (e.g. the tiny train step)."""
    e = dict(os.environ)
    flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    e.update(
        PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""),
        XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    return e


def sample_options(default_steps: int, /, **kw):
    """`sampling.runner.Options` from flag-like keywords: sampling knobs become `--config.sample.*` overrides
    (`default_steps` sampling steps and no progress bar unless given)."""
    import dataclasses

    from dreamvideo_jax.sampling import runner

    kw.setdefault("steps", default_steps)
    kw.setdefault("progress", False)
    fields = {f.name for f in dataclasses.fields(runner.Options)}
    overrides = {f"sample.{k}": v for k, v in kw.items() if k not in fields}
    return runner.Options(**{k: v for k, v in kw.items() if k in fields}, overrides=overrides)
