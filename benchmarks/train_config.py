"""The `config` suite: compile time, step time, examples/s and FLOPs of one config's real train step.

  python -m benchmarks --suite=config --config=configs/tiny.py [--steps=10] [--config.train.batch_size=8]
      [--step_memory]

`Trainer.train_step` (dreamvideo_jax/training/trainer.py) exactly as training runs it -- frozen VAE and text
encoder inside the step, the config's trainable subset, optimizer and EMA, sharded over `config.mesh` -- on fixed
random batches of videos, reference images and token ids (no data pipeline, no checkpoints). Step times are the
median over `--steps` timed steps after one warm-up step; each timed step waits for its result. `--step_memory`
also reports the compiled step's memory, at the price of compiling it once more (`common.lower_train_step`).
"""

from __future__ import annotations

import numpy as np

from benchmarks import common


def random_batch(config, batch_size: int, seed: int = 0) -> dict:
    """A numpy batch as the data pipeline yields it: `video` and `image` in [-1, 1], CLIP token ids."""
    from dreamvideo_jax.models import build as mb

    rng = np.random.default_rng(seed)
    f, h, w = int(config.num_frames), int(config.height), int(config.width)
    length = mb.text_config(config.model).context_length
    video = rng.uniform(-1, 1, (batch_size, f, h, w, 3)).astype(np.float32)
    return {"video": video, "image": video[:, 0], "tokens": rng.integers(0, 49408, (batch_size, length)).astype(np.int32)}


def run(config, steps: int = 10, memory: bool = False) -> dict:
    import jax

    from dreamvideo_jax.parallel.sharding import to_host

    b = int(config.train.batch_size) // jax.process_count()
    jb = common.TrainerBench(config, random_batch(config, b))
    compile_s = jb.compile()
    times = jb.time_steps(max(1, int(steps)), warmup=1)
    step_s = float(np.median(times))
    flops = jb.flops()
    counts = jb.param_counts()
    out = {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "mesh": dict(jb.tr.mesh.shape),
        "mode": jb.tr.mode,
        "batch_size": int(config.train.batch_size),
        "clip": [int(config.num_frames), int(config.height), int(config.width)],
        "params_trainable": counts["trainable"],
        "params_frozen": counts["frozen_model"] + counts["text_encoder"] + counts["vae"],
        "init_seconds": round(jb.init_s, 3),
        "compile_seconds": round(compile_s, 3),
        "lower_seconds": round(jb.tr.lower_seconds, 3),
        "step_seconds_median": round(step_s, 4),
        "step_seconds_min": round(min(times), 4),
        "examples_per_second": round(int(config.train.batch_size) / step_s, 3),
        "flops_per_step": flops,
        "gflops_per_second": round(flops / step_s / 1e9, 2) if flops else None,
        "final_loss": float(to_host(jb.metrics["loss"])),
    }
    if memory:
        out["memory"] = jb.memory()
    return out


def print_table(r: dict) -> None:
    print(f"\n== config {r.get('config_file', '')}: {r['mode']}, batch {r['batch_size']}, clip {r['clip']}, "
          f"{r['devices']} device(s), mesh {r['mesh']}; Trainer.train_step on random videos + tokens")
    gflops = f"{r['gflops_per_second']} GFLOP/s" if r["gflops_per_second"] is not None else "FLOPs not reported"
    print(f"step {r['step_seconds_median']:.3f} s median ({r['examples_per_second']:.2f} examples/s, {gflops}), "
          f"compile {r['compile_seconds']:.1f} s, init {r['init_seconds']:.1f} s")
    if "memory" in r:
        mem = r["memory"]
        print("compiled bytes: " + ", ".join(f"{k.replace('_bytes', '')} {common.gib(v)}" for k, v in mem.items()))
