"""Performance benchmarks of the DreamVideo U-Net + image-retention branch, side by side with PyTorch/diffusers.

  python -m dreamvideo_jax.benchmark [--suite=train|sample|memory|scaling|fullsize|all] [--output=FILE.json] [--quick]
  python -m dreamvideo_jax.benchmark --suite=config --config=configs/demo_shapes.py:t2v [--steps=10]

Suites (every timing is the median of N repeats after warm-up, both frameworks in the same process, float32, the
same number of CPU threads; the machines are noisy, so compare the ratios, not absolute times):

* train    train step (forward + backward + AdamW update of every parameter) and forward alone, ours vs diffusers'
           `UNet3DConditionModel` driven by a ControlNet-style branch (a torch copy of the U-Net's encoder half +
           zero 1x1 convs + diffusers' `ControlNetConditioningEmbedding`), residuals passed as
           `down_block_additional_residuals` / `mid_block_additional_residual`. Also the hardware limit: achieved
           FLOP/s of our train step (XLA cost analysis / time) vs the f32 matmul peak measured in the same run.
* sample   25 DDIM steps with double (text + image) guidance: `diffusion.samplers.sample` (one batched 3B forward
           per step) vs a diffusers-style loop (three torch forwards per step + DDIM arithmetic).
* memory   compiled temp memory of the train step with and without remat (`config.model.remat`, every layer
           rematerialised, models/remat.py) and their time ratio; per-device
           parameter + optimizer bytes of the full-size model under FSDP on 1/2/4/8 fake CPU devices (abstract
           shapes in a subprocess, nothing allocated).
* scaling  our train-step time vs frames and latent size.
* fullsize configs/modelscope_t2v.py at 256x256x16: parameter counts, FLOPs per train step and per sampling step from
           AOT lowering on abstract shapes, and estimated step time / videos per second on TPU v5p / v5e slices.
* config   the real train step of one config file (frozen VAE + text encoder, trainable subset, sharded, on random
           batches; `train_step_benchmark`), as `python -m dreamvideo_jax.training.benchmark` prints it. Not in
           `all`.

`--retain_freed_memory` keeps freed memory in the process for both frameworks (parallel/host_cpu.py). By default
glibc hands every large block back to the kernel on free, so each default-size train step faults its 4.4 GiB of
XLA temporaries in again (1.28 M page faults, ~4.8 s of system time); retained, 0 faults, but malloc's single
arena slows XLA's compiles by 20-35 s each, so it is off by default (WORKSPACE.md, Benchmarks).

`all` runs the first five in one process; the suites share the compiled train step and its parameters, and the
PyTorch models are freed as soon as their suite ends. Each suite's wall time is in the table and the JSON
(`suite_wall_s`).

Results go to the JSON file as nested dicts, e.g. {"train": {"train_step": {"ours_s", "torch_s", "ratio"}, ...}}.
Ratios are ours / torch (below 1 = we are faster).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

SUITES = ("train", "sample", "memory", "scaling", "fullsize")  # --suite=all
EXTRA_SUITES = ("config",)

# Assumed TPU peaks (dense bf16 FLOP/s per chip) and model FLOP utilisation for the full-size estimates.
TPU_PEAK_BF16 = {"v5p": 459e12, "v5e": 197e12}
TPU_SLICES = {"v5p": (8, 64), "v5e": (8, 64)}
ASSUMED_MFU = 0.40


# ------------------------------------------------------------------------------------------------------------
# Configs.


def bench_model_config(channels=(64, 128, 256), layers=2, head_dim=32, cross_dim=1024, remat=False,
                       image_input="pixels"):
    """`config.model` of a small DreamVideo (ModelScope block types: cross-attention everywhere but the deepest)."""
    from configs import modelscope_t2v

    m = modelscope_t2v.get_config().model
    n = len(channels)
    m.unet.block_out_channels = tuple(channels)
    m.unet.down_block_types = ("CrossAttnDownBlock3D",) * (n - 1) + ("DownBlock3D",)
    m.unet.up_block_types = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n - 1)
    m.unet.layers_per_block = layers
    m.unet.attention_head_dim = head_dim
    m.unet.cross_attention_dim = cross_dim
    m.text.width = cross_dim
    m.retention.image_input = image_input
    m.remat = remat
    return m


def sizes(quick: bool) -> dict:
    if quick:
        return dict(channels=(32, 64), layers=1, frames=8, hw=16, batch=1, repeats=2,
                    sample=dict(channels=(32, 64), layers=1, frames=4, hw=8, batch=1, steps=25, repeats=1),
                    scaling=dict(frames=(4, 8), hw=(8, 16)), matmul=1024)
    # Without remat the train step at 16 frames x 32^2 x batch 2 needs 23.5 GiB of XLA temp memory (compiled
    # memory analysis; 5.8 GiB with remat): too much for a 24 GiB machine next to PyTorch, so batch 1 x 8 frames.
    return dict(channels=(64, 128, 256), layers=2, frames=8, hw=32, batch=1, repeats=3,
                # One timed sampling run each (after ours' compiling call and torch's warm-up forward): 15-23 s
                # apiece, and the ratio (0.64) is far from the goal (0.8).
                sample=dict(channels=(32, 64, 128), layers=2, frames=8, hw=16, batch=1, steps=25, repeats=1),
                scaling=dict(frames=(8, 16, 32), hw=(16, 32, 64)), matmul=2048)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` (which must wait for its result) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    return statistics.median(time_calls(fn, repeats, warmup))


def compiled_flops(compiled_or_lowered) -> float:
    """FLOPs from XLA's cost analysis of a `jax.stages.Compiled` or `Lowered` (0 if the backend has none)."""
    ca = compiled_or_lowered.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float((ca or {}).get("flops", 0.0))


def compiled_memory(compiled) -> dict:
    """Argument / output / temp / alias bytes of a compiled executable ({} if the backend reports none)."""
    try:
        ma = compiled.memory_analysis()
        return {k: int(getattr(ma, k)) for k in
                ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")}
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {}


def _threads() -> int:
    return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------------------
# Ours (JAX).


class JaxBench:
    """Compiled forward / train step of `DreamVideo` for one model config and input shape."""

    def __init__(self, m, batch, frames, hw, seed=0, params=None):
        """`params`: a parameter tree to copy instead of initialising (parameters do not depend on the input
        shape or on remat, so the suites share one initialisation)."""
        import jax
        import jax.numpy as jnp
        import optax

        from dreamvideo_jax.models.build import build_dreamvideo, init_dreamvideo, latent_channels, retention_config

        self.model = build_dreamvideo(m)
        if params is None:
            params = init_dreamvideo(m, jax.random.key(seed))["params"]
        else:  # a copy: the train step donates its parameters
            params = jax.tree_util.tree_map(jnp.copy, params)
        self.params = params
        c = latent_channels(m)
        f = retention_config(m).image_downsample_factor
        k = jax.random.split(jax.random.key(seed + 1), 4)
        self.inputs = dict(
            latents=jax.random.normal(k[0], (batch, frames, hw, hw, c)),
            timesteps=jnp.full((batch,), 500, jnp.int32),
            context=jax.random.normal(k[1], (batch, 77, int(m.unet.cross_attention_dim))),
            image=jax.random.normal(k[2], (batch, hw * f, hw * f, 3)) if f > 1 or m.retention.image_input == "pixels"
            else jax.random.normal(k[2], (batch, hw, hw, c)),
        )
        self.target = jax.random.normal(k[3], self.inputs["latents"].shape)
        self.tx = optax.adamw(1e-4)
        self.opt_state = self.tx.init(self.params)
        model, tx = self.model, self.tx

        def forward(params, inputs):
            return model.apply({"params": params}, **inputs)

        def train_step(params, opt_state, inputs, target):
            def loss_fn(p):
                return jnp.mean((forward(p, inputs) - target) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.forward_fn, self.train_fn = forward, train_step
        self.forward = jax.jit(forward)
        self.train_lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(
            self.params, self.opt_state, self.inputs, self.target)
        t0 = time.perf_counter()
        self.train_compiled = self.train_lowered.compile()
        self.compile_s = time.perf_counter() - t0

    def train_flops(self) -> float:
        return compiled_flops(self.train_compiled)

    def memory(self) -> dict:
        ma = compiled_memory(self.train_compiled)
        return dict(temp_bytes=ma["temp_size_in_bytes"], argument_bytes=ma["argument_size_in_bytes"],
                    output_bytes=ma["output_size_in_bytes"])

    def time_train(self, repeats, warmup=1) -> float:
        state = {"p": self.params, "o": self.opt_state}

        def run():
            p, o, loss = self.train_compiled(state["p"], state["o"], self.inputs, self.target)
            loss.block_until_ready()
            state["p"], state["o"] = p, o

        t = _median_time(run, repeats, warmup)
        self.params, self.opt_state = state["p"], state["o"]
        return t

    def time_forward(self, repeats) -> float:
        return _median_time(lambda: self.forward(self.params, self.inputs).block_until_ready(), repeats)


# ------------------------------------------------------------------------------------------------------------
# Reference (PyTorch / diffusers).


class TorchDreamVideo:
    """diffusers `UNet3DConditionModel` + a ControlNet-style retention branch built from a copy of its encoder half."""

    def __init__(self, m):
        import torch
        from diffusers import UNet3DConditionModel
        from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

        torch.manual_seed(0)
        u = m.unet
        ch = tuple(u.block_out_channels)
        self.unet = UNet3DConditionModel(
            sample_size=32, in_channels=u.in_channels, out_channels=u.out_channels,
            down_block_types=tuple(u.down_block_types), up_block_types=tuple(u.up_block_types),
            block_out_channels=ch, layers_per_block=u.layers_per_block, norm_num_groups=u.norm_num_groups,
            cross_attention_dim=u.cross_attention_dim, attention_head_dim=u.attention_head_dim)
        # diffusers reads `attention_head_dim` as the number of heads of the spatial transformers; give them the
        # same layout as ours (heads = channels // attention_head_dim) so the attention kernels are comparable.
        for name, mod in self.unet.named_modules():
            if ".attentions." in name and hasattr(mod, "heads") and hasattr(mod, "inner_dim"):
                mod.heads = mod.inner_dim // u.attention_head_dim
        self.branch = copy.deepcopy(self.unet)
        self.branch.up_blocks = None
        self.branch.conv_norm_out = self.branch.conv_out = None
        self.zero_convs = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 1) for c in _skip_channels(u))
        self.mid_conv = torch.nn.Conv2d(ch[-1], ch[-1], 1)
        r = m.retention
        self.image_conv = ControlNetConditioningEmbedding(ch[0], r.image_channels, tuple(r.image_conv_channels))
        self.modules = torch.nn.ModuleList([self.unet, self.branch, self.zero_convs, self.mid_conv, self.image_conv])
        self.modules.eval()  # deterministic (no dropout), as our benchmark step

    def parameters(self):
        return self.modules.parameters()

    def _branch(self, sample, t, ctx, image):
        b = self.branch
        f = sample.shape[2]
        emb = b.time_embedding(b.time_proj(t).to(sample.dtype)).repeat_interleave(f, dim=0)
        ctx = ctx.repeat_interleave(f, dim=0)
        x = sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * f, -1) + sample.shape[3:])
        x = b.conv_in(x) + self.image_conv(image).repeat_interleave(f, dim=0)
        x = b.transformer_in(x, num_frames=f, return_dict=False)[0]
        skips = (x,)
        for blk in b.down_blocks:
            if getattr(blk, "has_cross_attention", False):
                x, res = blk(hidden_states=x, temb=emb, encoder_hidden_states=ctx, num_frames=f)
            else:
                x, res = blk(hidden_states=x, temb=emb, num_frames=f)
            skips += res
        x = b.mid_block(x, emb, encoder_hidden_states=ctx, num_frames=f)
        return [c(s) for c, s in zip(self.zero_convs, skips)], self.mid_conv(x)

    def __call__(self, sample, t, ctx, image):
        down, mid = self._branch(sample, t, ctx, image)
        return self.unet(sample, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


def _skip_channels(u) -> list[int]:
    ch = list(u.block_out_channels)
    out = [ch[0]]
    for i, c in enumerate(ch):
        out += [c] * u.layers_per_block
        if i < len(ch) - 1:
            out.append(c)
    return out


def _torch_inputs(m, batch, frames, hw, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(m.retention.image_conv_channels) - 1)
    return dict(
        sample=torch.randn(batch, m.unet.in_channels, frames, hw, hw, generator=g),
        t=torch.full((batch,), 500, dtype=torch.long),
        ctx=torch.randn(batch, 77, m.unet.cross_attention_dim, generator=g),
        image=torch.randn(batch, 3, hw * f, hw * f, generator=g),
    )


# ------------------------------------------------------------------------------------------------------------
# Suites.


def _matmul_peak(n: int, repeats: int) -> dict:
    import jax
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda x, y: x @ y)
    t_jax = _median_time(lambda: mm(a, a).block_until_ready(), max(repeats, 5))
    ta = torch.randn(n, n)
    with torch.no_grad():
        t_torch = _median_time(lambda: ta @ ta, max(repeats, 5))
    flops = 2.0 * n ** 3
    return {"n": n, "jax_flops_per_s": flops / t_jax, "torch_flops_per_s": flops / t_torch}


def suite_train(s, cache) -> dict:
    import torch

    m = bench_model_config(s["channels"], s["layers"])
    jb = _bench(cache, m, s)
    ours_fwd = jb.time_forward(s["repeats"])
    ours_train = cache["train_step_s"] = jb.time_train(s["repeats"])

    tm = TorchDreamVideo(m)
    inp = _torch_inputs(m, s["batch"], s["frames"], s["hw"])
    target = torch.randn_like(inp["sample"])
    opt = torch.optim.AdamW(list(tm.parameters()), lr=1e-4)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((tm(**inp) - target) ** 2)
        loss.backward()
        opt.step()

    def torch_fwd():
        with torch.no_grad():
            tm(**inp)

    torch_fwd_s = _median_time(torch_fwd, s["repeats"])
    torch_train_s = _median_time(torch_step, s["repeats"])
    n_ours = sum(int(np.prod(x.shape)) for x in _leaves(jb.params))
    n_torch = sum(p.numel() for p in tm.parameters())
    opt.zero_grad(set_to_none=True)
    flops = jb.train_flops()
    peak = _matmul_peak(s["matmul"], s["repeats"])
    achieved = flops / ours_train if ours_train > 0 else 0.0
    return {
        "config": dict(channels=list(s["channels"]), layers_per_block=s["layers"], frames=s["frames"], latent=s["hw"], batch=s["batch"],
                       params_ours=n_ours, params_torch=int(n_torch), compile_s=jb.compile_s),
        "train_step": _ratio(ours_train, torch_train_s),
        "forward": _ratio(ours_fwd, torch_fwd_s),
        "hardware": {
            "train_step_flops": flops,
            "achieved_flops_per_s": achieved,
            "matmul_peak_jax_flops_per_s": peak["jax_flops_per_s"],
            "matmul_peak_torch_flops_per_s": peak["torch_flops_per_s"],
            "fraction_of_jax_peak": achieved / peak["jax_flops_per_s"],
            "fraction_of_torch_peak": achieved / peak["torch_flops_per_s"],
            "matmul_n": peak["n"],
        },
    }


def _free_torch() -> None:
    """Return the PyTorch side's freed memory before the JAX side allocates (glibc keeps freed arenas)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _bench(cache, m, s, frames=None, hw=None) -> "JaxBench":
    """The shared `JaxBench` of the suite sizes (compiled once for train / memory / scaling), or a new one for
    other shapes or configs that copies the shared parameters."""
    frames, hw = frames or s["frames"], hw or s["hw"]
    shared = (frames, hw) == (s["frames"], s["hw"]) and not m.remat
    if shared and "bench" in cache:
        return cache["bench"]
    jb = JaxBench(m, s["batch"], frames, hw, params=cache.get("params"))
    if "params" not in cache:  # an untouched copy (the benches' own parameters are donated to their steps)
        import jax
        import jax.numpy as jnp

        cache["params"] = jax.tree_util.tree_map(jnp.copy, jb.params)
    if shared:
        cache["bench"] = jb
    return jb


def _ratio(ours, torch_s) -> dict:
    return {"ours_s": ours, "torch_s": torch_s, "ratio": ours / torch_s}


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def suite_sample(s, cache) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from dreamvideo_jax.diffusion import samplers, schedules

    c = s["sample"]
    m = bench_model_config(c["channels"], c["layers"])
    from dreamvideo_jax.models.build import build_dreamvideo, init_dreamvideo

    model = build_dreamvideo(m)
    params = init_dreamvideo(m, jax.random.key(0))["params"]
    b, f, hw, steps = c["batch"], c["frames"], c["hw"], c["steps"]
    shape = (b, f, hw, hw, 4)
    x_T = samplers.initial_noise(jax.random.key(1), shape)
    text = jax.random.normal(jax.random.key(2), (b, 77, int(m.unet.cross_attention_dim)))
    null = jnp.zeros((77, int(m.unet.cross_attention_dim)))
    image = jax.random.normal(jax.random.key(3), (b, 8 * hw, 8 * hw, 3))
    schedule = schedules.make_schedule()

    def apply(p, x, t, txt, img):
        return model.apply({"params": p}, x, t, txt, img)

    model_fn = jax.tree_util.Partial(apply, params)

    def ours():
        samplers.sample(model_fn, schedule, x_T, text_emb=text, null_text_emb=null, image=image, image_scale=3.0,
                        text_scale=9.0, sampler="ddim", num_steps=steps).block_until_ready()

    t0 = time.perf_counter()
    ours()
    first = time.perf_counter() - t0
    ours_s = _median_time(ours, c["repeats"], warmup=0)

    tm = TorchDreamVideo(m)
    inp = _torch_inputs(m, b, f, hw)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float()
    ts = list(range(0, 1000, 1000 // steps))[::-1]
    ts = [t + 1 for t in ts]
    ratio_ = 1000 // steps
    null_t = torch.zeros(b, 77, int(m.unet.cross_attention_dim))
    zero_img = torch.zeros_like(inp["image"])

    def reference():
        x = inp["sample"].clone()
        with torch.no_grad():
            for t in ts:
                tt = torch.full((b,), t, dtype=torch.long)
                e_u = tm(x, tt, null_t, zero_img)
                e_i = tm(x, tt, null_t, inp["image"])
                e_f = tm(x, tt, inp["ctx"], inp["image"])
                eps = e_u + 3.0 * (e_i - e_u) + 9.0 * (e_f - e_i)
                a_t = abar[t]
                a_p = abar[t - ratio_] if t - ratio_ >= 0 else abar[0]
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                x = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps
        return x

    with torch.no_grad():  # warm-up: one forward (a whole sampling run as warm-up cost minutes under load)
        tm(inp["sample"], torch.full((b,), ts[0], dtype=torch.long), inp["ctx"], inp["image"])
    torch_s = _median_time(reference, c["repeats"], warmup=0)
    out = _ratio(ours_s, torch_s)
    out["ours_first_call_s"] = first
    return {"config": dict(channels=list(c["channels"]), layers_per_block=c["layers"], frames=f, latent=hw, batch=b, steps=steps,
                           guidance="double (3 branches)"), "sample_ddim": out}


def suite_memory(s, cache) -> dict:
    m = bench_model_config(s["channels"], s["layers"])
    jb = _bench(cache, m, s)
    mr = bench_model_config(s["channels"], s["layers"], remat=True)
    jr = _bench(cache, mr, s)
    base_mem, remat_mem = jb.memory(), jr.memory()
    # Alternate the two steps so that load changes on a shared machine hit both alike.
    jb.time_train(1), jr.time_train(1)  # warm-up (the remat step's first run)
    t_base, t_remat = [], []
    for _ in range(s["repeats"]):
        t_base.append(jb.time_train(1, warmup=0))
        t_remat.append(jr.time_train(1, warmup=0))
    t_base, t_remat = statistics.median(t_base), statistics.median(t_remat)
    remat_compile_s, remat_flops = jr.compile_s, jr.train_flops()
    del jr
    fsdp = _fsdp_subprocess()
    return {
        "remat": {
            "policy": str(mr.remat_policy),
            "temp_bytes_no_remat": base_mem["temp_bytes"], "temp_bytes_remat": remat_mem["temp_bytes"],
            "temp_reduction": base_mem["temp_bytes"] / max(1, remat_mem["temp_bytes"]),
            "time_no_remat_s": t_base, "time_remat_s": t_remat, "time_ratio": t_remat / t_base,
            "flops_no_remat": jb.train_flops(), "flops_remat": remat_flops, "compile_remat_s": remat_compile_s,
        },
        "fsdp": fsdp,
    }


def _fsdp_subprocess() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = "from dreamvideo_jax import benchmark as b; import json; print('FSDP_JSON' + json.dumps(b.fsdp_bytes()))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    for line in res.stdout.splitlines():
        if line.startswith("FSDP_JSON"):
            return json.loads(line[len("FSDP_JSON"):])
    raise RuntimeError(f"FSDP subprocess failed:\n{res.stderr[-3000:]}")


def fsdp_bytes(device_counts=(1, 2, 4, 8)) -> dict:
    """Per-device parameter + AdamW-state bytes of the full-size model under FSDP (abstract; nothing allocated)."""
    import jax

    from configs import modelscope_t2v
    from dreamvideo_jax.models.build import abstract_variables, build_dreamvideo, dummy_inputs
    from dreamvideo_jax.parallel import mesh as mesh_lib
    from dreamvideo_jax.parallel import sharding as sh

    cfg = modelscope_t2v.get_config()
    m = cfg.model
    abstract = abstract_variables(build_dreamvideo(m), **dummy_inputs(m))["params"]
    rules = mesh_lib.rules_from_config(cfg.sharding)
    trainable = _trainable_mask(sh.unbox(abstract))
    out = {}
    for n in device_counts:
        if n > len(jax.devices()):
            continue
        mesh = mesh_lib.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, devices=jax.devices()[:n])
        shardings = sh.tree_shardings(abstract, mesh, rules, int(cfg.sharding.fsdp_min_size))
        leaves = jax.tree_util.tree_leaves(sh.unbox(abstract))
        shard_leaves = jax.tree_util.tree_leaves(shardings)
        flags = jax.tree_util.tree_leaves(trainable)
        p_bytes = o_bytes = 0
        for x, s_, tr in zip(leaves, shard_leaves, flags):
            b = int(np.prod(s_.shard_shape(x.shape))) * x.dtype.itemsize
            p_bytes += b
            if tr:
                o_bytes += 2 * b  # AdamW mu and nu, sharded like the parameter
        out[str(n)] = {"param_bytes": p_bytes, "opt_bytes": o_bytes, "total_bytes": p_bytes + o_bytes}
    base = out["1"]["total_bytes"]
    for v in out.values():
        v["reduction"] = base / v["total_bytes"]
    return out


def _trainable_mask(params) -> Any:
    import jax

    from dreamvideo_jax.training.config import DEFAULT_TRAINABLE

    pats = [re.compile(p) for p in DEFAULT_TRAINABLE["dreamvideo"]]

    def one(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return any(p.search(name) for p in pats)

    return jax.tree_util.tree_map_with_path(one, params)


def available_bytes() -> int:
    """Memory this process can still get without swapping: what the OS has, plus what malloc holds free here."""
    import psutil

    from dreamvideo_jax.parallel.host_cpu import retained_free_bytes

    return int(psutil.virtual_memory().available) + retained_free_bytes()


# A point runs only if its compiled buffers (arguments + outputs + XLA temporaries) fit in this share of the
# available memory; the rest is left for the host runtime. Larger points are reported as skipped, not run into
# the OOM killer (which would take every suite's results with it).
MEMORY_HEADROOM = 0.8


def extrapolated_bytes(known: list[tuple[float, int]], x: float) -> Optional[float]:
    """Compiled bytes at `x` extrapolated along a line through the two largest known points below it, or None.

    Along a scaling sweep the train step's buffers are the fixed parameter / optimizer bytes plus activations
    that grow at least linearly in the swept size (frames, or latent pixels, where spatial attention is
    quadratic), so this line under-estimates larger points: above the memory, the point need not be compiled.
    """
    below = sorted(p for p in known if p[0] < x)[-2:]
    if len(below) < 2:
        return None
    (x0, b0), (x1, b1) = below
    return b1 + (b1 - b0) / (x1 - x0) * (x - x1)


def _too_big(need: float, avail: int, extrapolated: bool) -> str:
    how = ">= {:.1f} GiB of compiled buffers (extrapolated from the smaller points)" if extrapolated else \
        "{:.1f} GiB of compiled buffers"
    return (f"needs {how.format(need / 2**30)}, {avail / 2**30:.1f} GiB available "
            "(model.remat=True or a larger machine)")


def suite_scaling(s, cache) -> dict:
    m = bench_model_config(s["channels"], s["layers"])
    rows, bytes_at = [], {}  # bytes_at: (frames, latent) -> compiled bytes (or their lower bound)
    # Two sweeps through the bench shape: frames at the bench latent size, latent size at the bench frames.
    sweeps = [[(f, s["hw"], f) for f in s["scaling"]["frames"]],
              [(s["frames"], h, h * h) for h in s["scaling"]["hw"]]]
    for points in sweeps:
        known = []  # (swept size, bytes) of this sweep's points so far
        for f, h, x in points:
            if (f, h) not in bytes_at:
                rows.append(_scaling_point(cache, m, s, f, h, extrapolated_bytes(known, x)))
                bytes_at[(f, h)] = rows[-1].get("compiled_bytes", rows[-1].get("compiled_bytes_at_least"))
            known.append((x, bytes_at[(f, h)]))
    return {"batch": s["batch"], "channels": list(s["channels"]), "points": rows}


def _scaling_point(cache, m, s, f, h, guess) -> dict:
    """One scaling row: skipped without compiling if the extrapolated bytes `guess` cannot fit, skipped after
    compiling if the compiled bytes cannot, timed otherwise."""
    avail = available_bytes()
    if guess is not None and guess > MEMORY_HEADROOM * avail:
        return {"frames": f, "latent": h, "compiled_bytes_at_least": int(guess),
                "skipped": _too_big(guess, avail, extrapolated=True)}
    jb = _bench(cache, m, s, f, h)
    mem = jb.memory()
    need = mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"]
    row = {"frames": f, "latent": h, "flops": jb.train_flops(), "compiled_bytes": need}
    if need > MEMORY_HEADROOM * avail:
        row["skipped"] = _too_big(need, avail, extrapolated=False)
    elif (f, h) == (s["frames"], s["hw"]) and "train_step_s" in cache:  # the train suite timed this very step
        t = cache["train_step_s"]
        row.update(train_step_s=t, s_per_gflop=t / max(row["flops"], 1) * 1e9, timed_by="train suite")
    else:
        t = jb.time_train(max(1, s["repeats"] - 1))
        row.update(train_step_s=t, s_per_gflop=t / max(row["flops"], 1) * 1e9)
    return row


def suite_fullsize(s, cache) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from configs import modelscope_t2v
    from dreamvideo_jax.diffusion import samplers
    from dreamvideo_jax.models.build import abstract_variables, build_dreamvideo, dummy_inputs
    from dreamvideo_jax.parallel import sharding as sh

    cfg = modelscope_t2v.get_config()
    m = cfg.model
    model = build_dreamvideo(m)
    params = sh.unbox(abstract_variables(model, **dummy_inputs(m))["params"])
    mask = _trainable_mask(params)
    leaves = jax.tree_util.tree_leaves(params)
    flags = jax.tree_util.tree_leaves(mask)
    total = sum(int(np.prod(x.shape)) for x in leaves)
    trainable = sum(int(np.prod(x.shape)) for x, f in zip(leaves, flags) if f)
    by_part = {k: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(v)) for k, v in params.items()}

    frames, h = int(cfg.num_frames), int(cfg.height) // 8
    batch = 1
    lat = jax.ShapeDtypeStruct((batch, frames, h, h, 4), jnp.float32)
    tt = jax.ShapeDtypeStruct((batch,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((batch, 77, int(m.unet.cross_attention_dim)), jnp.float32)
    img = jax.ShapeDtypeStruct((batch, int(cfg.height), int(cfg.width), 3), jnp.float32)
    tx = optax.adamw(1e-4)

    def split(p):
        tr = jax.tree_util.tree_map(lambda x, f: x if f else None, p, mask)
        fr = jax.tree_util.tree_map(lambda x, f: None if f else x, p, mask)
        return tr, fr

    def merge(tr, fr):
        return jax.tree_util.tree_map(lambda a, b: a if b is None else b, fr, tr, is_leaf=lambda x: x is None)

    tr_abs, fr_abs = split(params)
    opt_abs = jax.eval_shape(tx.init, tr_abs)

    def train_step(tr, fr, opt, x, t, c, i):
        def loss_fn(tr_):
            out = model.apply({"params": merge(tr_, fr)}, x, t, c, i)
            return jnp.mean(out ** 2)

        loss, g = jax.value_and_grad(loss_fn)(tr)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, loss

    def sample_step(p, x, t, c, null, i):
        def mf(x3, t3, c3, i3):
            return model.apply({"params": p}, x3, t3, c3, i3)

        x3, t3, c3, i3 = samplers.guidance_inputs(x, t, c, null, i)
        u, io, full = samplers.split_guidance_output(mf(x3, t3, c3, i3))
        return u + 3.0 * (io - u) + 9.0 * (full - io)

    t0 = time.perf_counter()
    train_lo = jax.jit(train_step).lower(tr_abs, fr_abs, opt_abs, lat, tt, ctx, img)
    train_flops = _lowered_flops(train_lo)
    null = jax.ShapeDtypeStruct((77, int(m.unet.cross_attention_dim)), jnp.float32)
    sample_lo = jax.jit(sample_step).lower(params, lat, tt, ctx, null, img)
    sample_flops = _lowered_flops(sample_lo)
    lower_s = time.perf_counter() - t0

    est = {}
    for chip, peak in TPU_PEAK_BF16.items():
        for n in TPU_SLICES[chip]:
            rate = n * peak * ASSUMED_MFU
            t_train = train_flops / rate  # per video (batch 1 per step), data parallel over the slice
            t_sample = 25 * sample_flops / rate
            est[f"{chip}-{n}"] = {
                "chips": n, "peak_bf16_flops_per_chip": peak, "mfu": ASSUMED_MFU,
                "train_videos_per_s": 1.0 / t_train,
                "train_step_s_batch_per_chip_1": train_flops / (peak * ASSUMED_MFU),
                "sample_25_ddim_s_per_video_per_chip": t_sample * n,
                "sample_videos_per_s": 1.0 / t_sample,
            }
    return {
        "config": dict(frames=frames, height=int(cfg.height), latent=h, batch_per_flops=batch, lower_s=lower_s),
        "params": {"total": total, "trainable": trainable, **{f"part_{k}": v for k, v in by_part.items()}},
        "flops": {"train_step_per_video": train_flops, "sampling_step_per_video_3_branches": sample_flops,
                  "sampling_25_ddim_per_video": 25 * sample_flops},
        "tpu_estimates": est,
    }


_lowered_flops = compiled_flops


def load_config(spec: str):
    """`configs/X.py[:arg]` -> `get_config(arg)` of that file (as absl's config_flags reads --config)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    mod_spec = importlib.util.spec_from_file_location(f"_bench_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def suite_config(s, cache, config_spec: str = "", steps: int = 10) -> dict:
    """The real train step of one config file (see dreamvideo_jax/training/benchmark.py)."""
    from dreamvideo_jax.training.benchmark import benchmark as train_step_benchmark

    if not config_spec:
        raise ValueError("--suite=config needs --config=configs/X.py[:arg]")
    return {"config_file": config_spec, **train_step_benchmark(load_config(config_spec), steps)}


# ------------------------------------------------------------------------------------------------------------
# Printing and CLI.


def machine_info() -> dict:
    import jax
    import torch

    from dreamvideo_jax.parallel.host_cpu import freed_memory_retained

    return {"cores": os.cpu_count(), "threads": _threads(), "python": platform.python_version(),
            "machine": platform.machine(), "jax": jax.__version__, "torch": torch.__version__,
            "devices": str(jax.devices()), "freed_memory_retained": freed_memory_retained()}


def _g(x):
    return f"{x:.3g}"


def _gib(b):
    return f"{b / 2**30:.3f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def print_tables(res: dict) -> None:
    mi = res["machine"]
    kept = "retained" if mi.get("freed_memory_retained") else "returned to the kernel"
    print(f"\n== machine: {mi['cores']} cores, {mi['threads']} threads, python {mi['python']}, jax {mi['jax']}, "
          f"torch {mi['torch']}, freed memory {kept}")
    if "train" in res:
        r = res["train"]
        c = r["config"]
        print(f"\n== train: channels {c['channels']} x {c['layers_per_block']} layers, {c['frames']} frames, {c['latent']}x{c['latent']} latents, "
              f"batch {c['batch']}, f32; params ours {c['params_ours']:,} / torch {c['params_torch']:,}")
        print(f"{'':14s}{'ours s':>10s}{'torch s':>10s}{'ratio':>8s}")
        for k in ("train_step", "forward"):
            print(f"{k:14s}{r[k]['ours_s']:10.3f}{r[k]['torch_s']:10.3f}{r[k]['ratio']:8.2f}")
        h = r["hardware"]
        print(f"hardware: train step {h['train_step_flops'] / 1e9:.1f} GFLOP, achieved "
              f"{h['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s; {h['matmul_n']}^2 f32 matmul peak JAX "
              f"{h['matmul_peak_jax_flops_per_s'] / 1e9:.1f} / torch {h['matmul_peak_torch_flops_per_s'] / 1e9:.1f} "
              f"GFLOP/s -> {100 * h['fraction_of_jax_peak']:.1f}% of JAX peak, "
              f"{100 * h['fraction_of_torch_peak']:.1f}% of torch peak")
    if "sample" in res:
        r = res["sample"]
        c = r["config"]
        s = r["sample_ddim"]
        print(f"\n== sample: {c['steps']} DDIM steps, double guidance, channels {c['channels']} x {c['layers_per_block']} layers, {c['frames']} frames, "
              f"{c['latent']}x{c['latent']} latents, batch {c['batch']}")
        print(f"ours {s['ours_s']:.2f} s (first call incl. compile {s['ours_first_call_s']:.1f} s), "
              f"torch {s['torch_s']:.2f} s, ratio {s['ratio']:.2f}")
    if "memory" in res:
        r = res["memory"]["remat"]
        print(f"\n== memory: train-step temp bytes no remat {_gib(r['temp_bytes_no_remat'])}, remat ({r['policy']}) "
              f"{_gib(r['temp_bytes_remat'])} -> {r['temp_reduction']:.2f}x less; time ratio remat/no-remat "
              f"{r['time_ratio']:.2f} ({r['time_no_remat_s']:.3f} -> {r['time_remat_s']:.3f} s), FLOPs ratio "
              f"{r['flops_remat'] / max(r['flops_no_remat'], 1):.2f}")
        print("FSDP (full-size model, per device):")
        print(f"{'devices':>8s}{'params':>14s}{'adamw':>14s}{'total':>14s}{'reduction':>11s}")
        for n, v in res["memory"]["fsdp"].items():
            print(f"{n:>8s}{_gib(v['param_bytes']):>14s}{_gib(v['opt_bytes']):>14s}{_gib(v['total_bytes']):>14s}"
                  f"{v['reduction']:10.2f}x")
    if "scaling" in res:
        r = res["scaling"]
        print(f"\n== scaling (ours, train step, batch {r['batch']}, channels {r['channels']}):")
        print(f"{'frames':>7s}{'latent':>8s}{'step s':>9s}{'GFLOP':>9s}{'ms/GFLOP':>10s}")
        for p in r["points"]:
            if "skipped" in p:
                gflop = f"{p['flops'] / 1e9:9.1f}" if "flops" in p else f"{'-':>9s}"
                print(f"{p['frames']:7d}{p['latent']:8d}{'-':>9s}{gflop}{'-':>10s}  skipped: {p['skipped']}")
                continue
            print(f"{p['frames']:7d}{p['latent']:8d}{p['train_step_s']:9.3f}{p['flops'] / 1e9:9.1f}"
                  f"{p['s_per_gflop'] * 1e3:10.2f}")
    if "config" in res:
        r = res["config"]
        print(f"\n== config {r['config_file']}: {r['mode']}, batch {r['batch_size']}, clip {r['clip']}, "
              f"{r['devices']} device(s)")
        print(f"step {r['step_seconds_median']:.3f} s median ({r['examples_per_second']:.2f} examples/s, "
              f"{r['gflops_per_second']} GFLOP/s), compile {r['compile_seconds']:.1f} s, init {r['init_seconds']:.1f} s")
    if "fullsize" in res:
        r = res["fullsize"]
        p, f = r["params"], r["flops"]
        print(f"\n== fullsize: modelscope_t2v + retention, {r['config']['height']}px x {r['config']['frames']} frames "
              f"(latents {r['config']['latent']}^2 x 4)")
        print(f"params total {p['total']:,}, trainable {p['trainable']:,}")
        print(f"FLOPs/video: train step {f['train_step_per_video'] / 1e12:.2f} T, sampling step (3 branches) "
              f"{f['sampling_step_per_video_3_branches'] / 1e12:.2f} T, 25 DDIM {f['sampling_25_ddim_per_video'] / 1e12:.1f} T")
        print(f"TPU estimates at MFU {ASSUMED_MFU:.0%} (bf16 peak/chip: v5p 459 TFLOP/s, v5e 197 TFLOP/s):")
        print(f"{'slice':>9s}{'train step s (1 video/chip)':>29s}{'train videos/s':>16s}{'sample videos/s':>17s}")
        for k, v in r["tpu_estimates"].items():
            print(f"{k:>9s}{v['train_step_s_batch_per_chip_1']:29.3f}{v['train_videos_per_s']:16.1f}"
                  f"{v['sample_videos_per_s']:17.2f}")
    if res.get("suite_wall_s"):
        walls = res["suite_wall_s"]
        print("\n== wall seconds per suite: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items())
              + f"; total {res['total_wall_s']:.0f} s")


def run(suites, quick=False, config_spec: str = "", steps: int = 10, suite_sizes: dict | None = None,
        output: str = "") -> dict:
    """Runs the suites in order; `suite_sizes` replaces `sizes(quick)` (the tests use tiny shapes). With
    `output`, the results so far are written after every suite (`"complete": false` until the last one), so a
    run that is killed keeps the suites it finished."""
    import torch

    from dreamvideo_jax.sampling.outputs import write_json

    torch.set_num_threads(_threads())
    s = suite_sizes or sizes(quick)
    res = {"machine": machine_info(), "quick": quick, "suite_wall_s": {}}
    cache: dict = {}
    fns = {"train": suite_train, "sample": suite_sample, "memory": suite_memory, "scaling": suite_scaling,
           "fullsize": suite_fullsize,
           "config": lambda s_, c_: suite_config(s_, c_, config_spec, steps)}
    t_all = time.perf_counter()
    for name in suites:
        t0 = time.perf_counter()
        res[name] = fns[name](s, cache)
        _free_torch()  # the suite's PyTorch models died with its locals
        res[name]["suite_wall_s"] = res["suite_wall_s"][name] = time.perf_counter() - t0
        print(f"[{name}: {res[name]['suite_wall_s']:.0f} s]", file=sys.stderr, flush=True)
        if output:
            write_json(output, {**res, "complete": False})
    res["total_wall_s"] = time.perf_counter() - t_all
    res["complete"] = True
    # Flat copies of the headline ratios at the top level.
    if "train" in res:
        res["train_step"] = res["train"]["train_step"]
        res["forward"] = res["train"]["forward"]
    if "sample" in res:
        res["sample_ddim"] = res["sample"]["sample_ddim"]
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m dreamvideo_jax.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="all", choices=SUITES + EXTRA_SUITES + ("all",))
    p.add_argument("--output", default="", help="write the results as JSON to this file")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    p.add_argument("--config", default="", help="--suite=config: config file, configs/X.py[:arg]")
    p.add_argument("--steps", type=int, default=10, help="--suite=config: timed train steps")
    p.add_argument("--retain_freed_memory", action=argparse.BooleanOptionalAction, default=False,
                   help="keep freed memory in the process for both frameworks (parallel/host_cpu.py): no page "
                        "faults per step, slower compiles")
    a = p.parse_args(argv)
    if a.suite == "config" and not a.config:
        p.error("--suite=config needs --config=configs/X.py[:arg]")
    if a.retain_freed_memory:
        from dreamvideo_jax.parallel.host_cpu import retain_freed_memory

        retain_freed_memory()
    suites = SUITES if a.suite == "all" else (a.suite,)
    res = run(suites, a.quick, a.config, a.steps, output=a.output)
    print_tables(res)
    if a.output:
        from dreamvideo_jax.sampling.outputs import write_json

        write_json(a.output, res)
        print(f"\nwrote {a.output}")
    return res


if __name__ == "__main__":
    main()
