"""Benchmark: Python loop over the compiled guided step vs one ``lax.scan``, on small conv models.

Run: ``python -m dreamvideo_jax.diffusion.benchmark_sampling [--steps 25 50] [--repeats 5]``

Prints one JSON line per (model size, sampler, loop, steps): first-call time (compile + run) and the
median steady-state time of a full sampling run. The machines are noisy: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dreamvideo_jax.diffusion import samplers, schedules


def _conv_model(params, x, t, text, image):
    """A tiny conditioned conv net on (N, F, h, w, C) latents: per-frame 3x3 convs, FiLM from t and text."""
    n, f, h, w, c = x.shape
    frames = x.reshape(n * f, h, w, c) + image.reshape(n * f, h, w, c)
    temb = jnp.sin(t.astype(jnp.float32)[:, None] * params["freq"])  # (N, H)
    cond = temb + text.mean(axis=1) @ params["text_proj"]  # (N, H)
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(frames, params["w1"], (1, 1), "SAME", dimension_numbers=dn)
    y = jax.nn.silu(y + jnp.repeat(cond, f, axis=0)[:, None, None, :])
    y = jax.lax.conv_general_dilated(y, params["w2"], (1, 1), "SAME", dimension_numbers=dn)
    return y.reshape(n, f, h, w, c)


def _init(key, channels, hidden, text_dim):
    k = jax.random.split(key, 4)
    return {
        "w1": jax.random.normal(k[0], (3, 3, channels, hidden)) * 0.1,
        "w2": jax.random.normal(k[1], (3, 3, hidden, channels)) * 0.1,
        "freq": jax.random.normal(k[2], (hidden,)),
        "text_proj": jax.random.normal(k[3], (text_dim, hidden)) * 0.1,
    }


def run(steps=(25, 50), repeats=5, batch=2) -> list[dict]:
    sizes = {
        "tiny (F8 8x8x4, hidden 32)": dict(frames=8, hw=8, channels=4, hidden=32),
        "demo-like (F8 8x8x48, hidden 128)": dict(frames=8, hw=8, channels=48, hidden=128),
    }
    schedule = schedules.make_schedule()
    results = []
    for name, s in sizes.items():
        params = _init(jax.random.key(0), s["channels"], s["hidden"], 16)
        model = jax.tree_util.Partial(_conv_model, params)
        shape = (batch, s["frames"], s["hw"], s["hw"], s["channels"])
        x_T = samplers.initial_noise(jax.random.key(1), shape)
        text = jax.random.normal(jax.random.key(2), (batch, 8, 16))
        null = jnp.zeros((8, 16))
        image = jax.random.normal(jax.random.key(3), shape)
        for sampler in ("ddim", "dpmpp_2m"):
            for loop in ("python", "scan"):
                for n in steps:

                    def go(scale):
                        return samplers.sample(
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
                    row = dict(model=name, sampler=sampler, loop=loop, steps=n, first_call_s=round(first, 3),
                               run_s=round(med, 4), per_step_ms=round(1e3 * med / n, 3))  # fmt: skip
                    results.append(row)
                    print(json.dumps(row), flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run(tuple(args.steps), args.repeats)


if __name__ == "__main__":
    main()
