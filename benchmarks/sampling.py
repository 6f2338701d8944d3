"""The `sampling_loop` suite: the sampling pipeline's Python loop vs `lax.scan`, per sampler, batch size and step
count, with random weights; compile time apart from sampling time.

  python -m benchmarks --suite=sampling_loop [--config=configs/tiny.py] [--sampling_steps=10,25]
      [--sampling_batch=1,2] [--samplers=ddim,dpmpp_2m] [--loops=python,scan] [--sampling_repeats=3] [--toy_models]

One row per (sampler, loop, batch, steps) of `Sampler.sample_latents` (dreamvideo_jax/sampling/pipeline.py):
`compile_s` (ahead-of-time compilation of the step / scan executable; the text encoder and the preparation are
compiled once per shape and reported in the first row), `sample_s` (median wall time of the denoising loop,
`Timings.sample_s`, over the repeats, each with new guidance scales and seed, which must not recompile),
`ms_per_step` and `recompiles` (executables compiled after the first run: 0 for the Python loop; the scan compiles
once per step count). `--toy_models` adds the same comparison for `diffusion.samplers.sample` on two small conv
models (no Sampler, no U-Net). The machines are noisy: compare ratios within a run.
"""

from __future__ import annotations

import statistics
import time


def run_pipeline(config, steps=(10, 25), batches=(1,), samplers=("ddim", "dpmpp_2m"), loops=("python", "scan"),
                 repeats: int = 3, config_name: str = "") -> list[dict]:
    import ml_collections
    import numpy as np

    from dreamvideo_jax.sampling import config as sample_config
    from dreamvideo_jax.sampling.pipeline import Sampler
    from dreamvideo_jax.system import System

    variables = System(config).random_params(seed=0)
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
                    rows.append(dict(config=config_name, sampler=name, loop=loop, batch=b, steps=n,
                                     compile_s=round(first.compile_s, 2), first_compiles=first.compiles,
                                     sample_s=round(med, 3), ms_per_step=round(1e3 * med / n, 1),
                                     recompiles=recompiles))
    return rows


def _conv_model(params, x, t, text, image):
    """A tiny conditioned conv net on (N, F, h, w, C) latents: per-frame 3x3 convs, FiLM from t and text."""
    import jax
    import jax.numpy as jnp

    n, f, h, w, c = x.shape
    frames = x.reshape(n * f, h, w, c) + image.reshape(n * f, h, w, c)
    temb = jnp.sin(t.astype(jnp.float32)[:, None] * params["freq"])  # (N, H)
    cond = temb + text.mean(axis=1) @ params["text_proj"]  # (N, H)
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(frames, params["w1"], (1, 1), "SAME", dimension_numbers=dn)
    y = jax.nn.silu(y + jnp.repeat(cond, f, axis=0)[:, None, None, :])
    y = jax.lax.conv_general_dilated(y, params["w2"], (1, 1), "SAME", dimension_numbers=dn)
    return y.reshape(n, f, h, w, c)


def _init_conv_model(key, channels, hidden, text_dim):
    import jax

    k = jax.random.split(key, 4)
    return {
        "w1": jax.random.normal(k[0], (3, 3, channels, hidden)) * 0.1,
        "w2": jax.random.normal(k[1], (3, 3, hidden, channels)) * 0.1,
        "freq": jax.random.normal(k[2], (hidden,)),
        "text_proj": jax.random.normal(k[3], (text_dim, hidden)) * 0.1,
    }


TOY_MODELS = {
    "toy conv F8 8x8x4, hidden 32": dict(frames=8, hw=8, channels=4, hidden=32),
    "toy conv F8 8x8x48, hidden 128": dict(frames=8, hw=8, channels=48, hidden=128),
}


def run_toy(steps=(25, 50), samplers=("ddim", "dpmpp_2m"), loops=("python", "scan"), repeats: int = 5,
            batch: int = 2) -> list[dict]:
    """`diffusion.samplers.sample` on the toy conv models: first call (compile + run) and the median run."""
    import jax
    import jax.numpy as jnp

    from dreamvideo_jax.diffusion import samplers as samplers_lib
    from dreamvideo_jax.diffusion import schedules

    schedule = schedules.make_schedule()
    rows = []
    for name, s in TOY_MODELS.items():
        params = _init_conv_model(jax.random.key(0), s["channels"], s["hidden"], 16)
        model = jax.tree_util.Partial(_conv_model, params)
        shape = (batch, s["frames"], s["hw"], s["hw"], s["channels"])
        x_T = samplers_lib.initial_noise(jax.random.key(1), shape)
        text = jax.random.normal(jax.random.key(2), (batch, 8, 16))
        null = jnp.zeros((8, 16))
        image = jax.random.normal(jax.random.key(3), shape)
        for sampler in samplers:
            for loop in loops:
                for n in steps:

                    def go(scale):
                        return samplers_lib.sample(
                            model, schedule, x_T, text_emb=text, null_text_emb=null, image=image,
                            image_scale=1.5, text_scale=scale, sampler=sampler, num_steps=n, loop=loop,
                        ).block_until_ready()  # fmt: skip

                    t0 = time.perf_counter()
                    go(7.5)
                    first = time.perf_counter() - t0
                    times = []
                    for r in range(repeats):
                        t0 = time.perf_counter()
                        go(7.5 + r)  # new guidance scale each run: must not recompile
                        times.append(time.perf_counter() - t0)
                    med = statistics.median(times)
                    rows.append(dict(model=name, sampler=sampler, loop=loop, batch=batch, steps=n,
                                     first_call_s=round(first, 3), sample_s=round(med, 4),
                                     ms_per_step=round(1e3 * med / n, 3)))
    return rows


def run(config, steps=(10, 25), batches=(1,), samplers=("ddim", "dpmpp_2m"), loops=("python", "scan"),
        repeats: int = 3, toy_models: bool = False, config_name: str = "") -> dict:
    out = {"pipeline": run_pipeline(config, steps, batches, samplers, loops, repeats, config_name)}
    if toy_models:
        out["toy_models"] = run_toy(steps, samplers, loops, max(repeats, 1))
    return out


def print_table(r: dict) -> None:
    rows = r["pipeline"]
    name = rows[0]["config"] if rows else ""
    print(f"\n== sampling_loop: Sampler.sample_latents, {name} with random weights (sample_s: the denoising loop)")
    print(f"{'sampler':>9s}{'loop':>8s}{'batch':>6s}{'steps':>6s}{'compile s':>10s}{'sample s':>10s}"
          f"{'ms/step':>9s}{'recompiles':>11s}")
    for x in rows:
        print(f"{x['sampler']:>9s}{x['loop']:>8s}{x['batch']:6d}{x['steps']:6d}{x['compile_s']:10.2f}"
              f"{x['sample_s']:10.3f}{x['ms_per_step']:9.1f}{x['recompiles']:11d}")
    if r.get("toy_models"):
        print("toy conv models, diffusion.samplers.sample:")
        print(f"{'model':>32s}{'sampler':>9s}{'loop':>8s}{'steps':>6s}{'first s':>9s}{'sample s':>10s}{'ms/step':>9s}")
        for x in r["toy_models"]:
            print(f"{x['model']:>32s}{x['sampler']:>9s}{x['loop']:>8s}{x['steps']:6d}{x['first_call_s']:9.2f}"
                  f"{x['sample_s']:10.4f}{x['ms_per_step']:9.2f}")
