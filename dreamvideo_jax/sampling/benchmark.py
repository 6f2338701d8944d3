"""Benchmark of the sampling pipeline with random weights: compile time apart from sampling time, Python loop vs
``lax.scan``, per sampler and batch size.

  python -m dreamvideo_jax.sampling.benchmark --config=configs/tiny.py --steps 10 25 --batch 1 2

Prints one JSON line per (sampler, loop, batch, steps): ``compile_s`` (ahead-of-time compilation of the step /
scan executable; the text encoder, preparation and decoder are compiled once per shape and reported in the first
row), ``sample_s`` (median wall time of the denoising loop over ``--repeats`` runs, each with new guidance scales
and seed, which must not recompile), ``ms_per_step`` and ``recompiles`` (executables compiled after the first run:
0 for the Python loop; the scan compiles once per step count). The machines are noisy: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics

import numpy as np


def _load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run(config_path: str, steps=(10, 25), batches=(1,), samplers=("ddim", "dpmpp_2m"), loops=("python", "scan"),
        repeats: int = 3) -> list[dict]:
    import ml_collections

    from dreamvideo_jax.sampling import config as sample_config
    from dreamvideo_jax.sampling import weights
    from dreamvideo_jax.sampling.pipeline import Sampler

    config = _load_config(config_path)
    variables = weights.random_variables(config, seed=0)
    rows = []
    image = (np.random.default_rng(0).random((int(config.height), int(config.width), 3)) * 255).astype(np.uint8)
    for loop in loops:
        c = ml_collections.ConfigDict(config.to_dict())
        c.sample = sample_config.resolve(config)
        c.sample.loop = loop
        sampler = Sampler(c, variables)
        for name in samplers:
            for b in batches:
                prompts = [f"prompt {i}" for i in range(b)]
                for n in steps:
                    sampler.sample_latents(image, prompts, steps=n, sampler=name, seed=0)
                    first = sampler.timings
                    times, recompiles = [], 0
                    for r in range(repeats):
                        sampler.sample_latents(image, prompts, steps=n, sampler=name, seed=r + 1,
                                               text_guidance=5.0 + r, image_guidance=1.0 + 0.5 * r)
                        times.append(sampler.timings.sample_s)
                        recompiles += sampler.timings.compiles
                    med = statistics.median(times)
                    row = dict(config=os.path.basename(config_path), sampler=name, loop=loop, batch=b, steps=n,
                               compile_s=round(first.compile_s, 2), first_compiles=first.compiles,
                               sample_s=round(med, 3), ms_per_step=round(1e3 * med / n, 1), recompiles=recompiles)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpmpp_2m"])
    parser.add_argument("--loops", nargs="+", default=["python", "scan"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(args.config, tuple(args.steps), tuple(args.batch), tuple(args.samplers), tuple(args.loops), args.repeats)


if __name__ == "__main__":
    main()
