r"""Train-step benchmark: compile time, step time, examples/s, FLOPs and memory of a config's train step.

  python -m dreamvideo_jax.training.benchmark --config=configs/tiny.py [--steps=10] [--config.train.batch_size=8]

Runs on fixed random batches (no data pipeline, no checkpoints) and prints one JSON object. Step times are the
median over `--steps` timed steps after one warm-up step; each timed step waits for its result. The same numbers
come out of `python -m dreamvideo_jax.benchmark --suite=config --config=...` (the timing, FLOP and memory helpers
are that module's).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed steps.")


def benchmark(config, steps: int = 10) -> dict:
    import jax
    import numpy as np

    from dreamvideo_jax.benchmark import compiled_flops, compiled_memory, time_calls
    from dreamvideo_jax.models import build as mb
    from dreamvideo_jax.parallel.sharding import to_host
    from dreamvideo_jax.training.trainer import Trainer

    tr = Trainer(config)
    t0 = time.perf_counter()
    params = tr.init_params(jax.random.key(int(config.seed)))
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    trainable, frozen = tr.split(params)
    state = tr.init_state(trainable)
    b = int(config.train.batch_size) // jax.process_count()
    rng = np.random.default_rng(0)
    f, h, w = int(config.num_frames), int(config.height), int(config.width)
    length = mb.text_config(config.model).context_length
    video = rng.uniform(-1, 1, (b, f, h, w, 3)).astype(np.float32)
    batch = tr.global_batch({"video": video, "image": video[:, 0],
                             "tokens": rng.integers(0, 49408, (b, length)).astype(np.int32)})
    compile_s = tr.compile(state, frozen, batch)
    run = {"state": state, "metrics": None}

    def step():
        run["state"], run["metrics"] = tr.train_step(run["state"], frozen, batch)
        jax.block_until_ready(run["metrics"])

    times = time_calls(step, max(1, int(steps)), warmup=1)
    m = run["metrics"]
    step_s = statistics.median(times)
    flops = compiled_flops(tr._compiled)
    mem = compiled_memory(tr._compiled)
    n = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
    return {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "mesh": dict(tr.mesh.shape),
        "mode": tr.mode,
        "batch_size": int(config.train.batch_size),
        "clip": [f, h, w],
        "params_trainable": n(trainable),
        "params_frozen": n(frozen),
        "init_seconds": round(init_s, 3),
        "compile_seconds": round(compile_s, 3),
        "lower_seconds": round(tr.lower_seconds, 3),
        "step_seconds_median": round(step_s, 4),
        "step_seconds_min": round(min(times), 4),
        "examples_per_second": round(int(config.train.batch_size) / step_s, 3),
        "flops_per_step": flops,
        "gflops_per_second": round(flops / step_s / 1e9, 2) if flops else None,
        "memory": mem,
        "final_loss": float(to_host(m["loss"])),
    }


def main(argv) -> None:
    del argv
    print(json.dumps(benchmark(FLAGS.config, FLAGS.steps), indent=2), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    try:
        app.run(main)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
