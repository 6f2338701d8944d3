"""The DreamVideo U-Net + image-retention branch against PyTorch/diffusers: suites train, sample, memory, scaling,
fullsize (`python -m benchmarks --suite=...`; `all` runs these five in one process).

Both frameworks run in the same process, float32, with the same number of CPU threads; every timing is a median
after warm-up. The machines are noisy, so compare the ratios (ours / torch, below 1 = we are faster), not
absolute times.

* train    `Trainer.train_step` (dreamvideo_jax/training/trainer.py), the step training runs, on a config made to
           do the work the PyTorch side does: every model parameter trainable, AdamW (lr 1e-4, weight decay 0.01),
           no gradient clipping, no EMA, no condition dropout, no dropout, and a batch of precomputed latents and
           text embeddings (so no VAE or text encoding of the batch; the step still encodes the empty prompt with a
           1-layer text encoder, whose FLOPs are reported). The PyTorch side: diffusers' `UNet3DConditionModel`
           driven by a ControlNet-style branch (a torch copy of the U-Net's encoder half + zero 1x1 convs +
           diffusers' `ControlNetConditioningEmbedding`, residuals passed as `down_block_additional_residuals` /
           `mid_block_additional_residual`), MSE, backward and `torch.optim.AdamW` over every parameter. Also the
           forward alone (`DreamVideo.apply` vs the torch module, no gradients) and the hardware limit: achieved
           FLOP/s of the train step (XLA cost analysis / time) vs the f32 matmul peak measured in the same run.
* sample   25 DDIM steps with double (text + image) guidance: `Sampler.sample_latents`
           (dreamvideo_jax/sampling/pipeline.py) with random weights, its denoising loop (`Timings.sample_s`: one
           batched forward over the three guidance branches per step) vs a diffusers-style loop (three torch
           forwards per step + the DDIM update) on precomputed text embeddings; text encoding is timed on neither.
* memory   compiled temp memory of the train step with and without remat (`config.model.remat`, models/remat.py)
           and their time ratio (`Trainer.train_step` both); per-device parameter + AdamW bytes of the full-size
           model under FSDP on 1/2/4/8 fake CPU devices (abstract shapes in a subprocess, nothing allocated).
* scaling  the train step's time vs frames and latent size; a point whose compiled buffers cannot fit in memory
           is reported, not run.
* fullsize configs/modelscope_t2v.py at 256x256x16: parameter counts, FLOPs of the train step (the Trainer's
           step function on precomputed latents and text embeddings) and of one sampling step, from lowering on
           abstract shapes, and estimated step time / videos per second on TPU v5p / v5e slices.

The suites share the parameters and the compiled train step of the suite sizes; the PyTorch models are freed when
their suite ends. `Trainer` reports its step's FLOPs but not its memory, so the memory and scaling suites compile
the same step function once more for `memory_analysis()` (`common.lower_train_step`).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import common

# Assumed TPU peaks (dense bf16 FLOP/s per chip) and model FLOP utilisation for the full-size estimates.
TPU_PEAK_BF16 = {"v5p": 459e12, "v5e": 197e12}
TPU_SLICES = {"v5p": (8, 64), "v5e": (8, 64)}
ASSUMED_MFU = 0.40

GUIDANCE = dict(image=3.0, text=9.0)  # the sample suite's double-guidance scales


def sizes(quick: bool) -> dict:
    """Shapes and repeats of the suites. Optional keys: `cross_dim` (text width, default 1024), `head_dim` (32)."""
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


# ------------------------------------------------------------------------------------------------------------
# Configs.


def bench_config(channels=(64, 128, 256), layers=2, frames=8, hw=32, batch=1, head_dim=32, cross_dim=1024,
                 remat=False):
    """A full config of a small DreamVideo (ModelScope block types: cross-attention everywhere but the deepest)
    whose train step does what the PyTorch side of the train suite does (module docstring)."""
    from configs import modelscope_t2v

    c = modelscope_t2v.get_config()
    c.num_frames, c.height, c.width = frames, 8 * hw, 8 * hw
    m = c.model
    n = len(channels)
    m.unet.block_out_channels = tuple(channels)
    m.unet.down_block_types = ("CrossAttnDownBlock3D",) * (n - 1) + ("DownBlock3D",)
    m.unet.up_block_types = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n - 1)
    m.unet.layers_per_block = layers
    m.unet.attention_head_dim = head_dim
    m.unet.cross_attention_dim = cross_dim
    m.unet.temporal_dropout = 0.0  # the PyTorch side runs in eval mode
    m.retention.image_input = "pixels"
    m.remat = remat
    # The text encoder and the VAE never see the batch (latents and text embeddings come precomputed); the
    # step encodes only the empty prompt, with one layer. A minimal VAE with the same 8x factor and 4 channels.
    m.text.width, m.text.num_layers, m.text.output_layer = cross_dim, 1, 1
    m.text.num_heads = max(1, cross_dim // 64)
    m.vae.block_out_channels, m.vae.layers_per_block, m.vae.norm_num_groups = (8, 8, 8, 8), 1, 8
    m.vae.mid_block_add_attention = False

    t = c.train
    t.batch_size = batch
    t.trainable = (r".*",)  # every model parameter, as the PyTorch side
    t.learning_rate, t.warmup_steps, t.lr_schedule = 1e-4, 0, "constant"
    t.weight_decay = 0.01  # torch.optim.AdamW's default
    t.grad_clip_norm = 0.0
    t.ema_decay = 0.0
    t.condition_dropout = 0.0
    c.mesh.data, c.mesh.fsdp = 1, 1
    return c


def _suite_config(s: dict, frames=None, hw=None, remat=False, sample=False):
    d = s["sample"] if sample else s
    return bench_config(d["channels"], d["layers"], frames or d["frames"], hw or d["hw"], d["batch"],
                        head_dim=s.get("head_dim", 32), cross_dim=s.get("cross_dim", 1024), remat=remat)


def _numpy_batch(config, seed=0) -> dict:
    """Precomputed latents and text embeddings, and the reference image in pixels."""
    from dreamvideo_jax.models import build as mb

    rng = np.random.default_rng(seed)
    m = config.model
    b, f = int(config.train.batch_size), int(config.num_frames)
    h, w = mb.latent_size(m, int(config.height), int(config.width))
    length = mb.text_config(m).context_length
    return {
        "latents": rng.standard_normal((b, f, h, w, mb.latent_channels(m))).astype(np.float32),
        "context": rng.standard_normal((b, length, int(m.unet.cross_attention_dim))).astype(np.float32),
        "image": rng.uniform(-1, 1, (b, int(config.height), int(config.width), 3)).astype(np.float32),
    }


def train_bench(cache: dict, s: dict, frames=None, hw=None, remat=False) -> common.TrainerBench:
    """The shared bench of the suite sizes (compiled once for train / memory / scaling), or a new one for other
    shapes or remat that starts from the shared parameters. Nothing is compiled here."""
    frames, hw = frames or s["frames"], hw or s["hw"]
    shared = (frames, hw) == (s["frames"], s["hw"]) and not remat
    if shared and "bench" in cache:
        return cache["bench"]
    config = _suite_config(s, frames, hw, remat)
    jb = common.TrainerBench(config, _numpy_batch(config), mesh=common.one_device_mesh(), params=cache.get("params"))
    cache.setdefault("params", jb.params)
    if shared:
        cache["bench"] = jb
    return jb


def _text_encoder_flops(jb: common.TrainerBench) -> float:
    """FLOPs of the step's encoding of the empty prompt (lowered alone, not compiled)."""
    import jax
    import jax.numpy as jnp

    from dreamvideo_jax.models import build as mb

    te = jb.tr.system.text_encoder
    p = jb.frozen["text_encoder"]
    ids = jax.ShapeDtypeStruct((1, mb.text_config(jb.config.model).context_length), jnp.int32)
    lowered = jax.jit(lambda p_, i: te.apply({"params": p_} if p_ else {}, i)).lower(p, ids)
    return common.compiled_flops(lowered)


# ------------------------------------------------------------------------------------------------------------
# Reference (PyTorch / diffusers).


def _torch():
    import torch

    torch.set_num_threads(common.threads())
    return torch


class TorchDreamVideo:
    """diffusers `UNet3DConditionModel` + a ControlNet-style retention branch built from a copy of its encoder half."""

    def __init__(self, m):
        torch = _torch()
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
        self.modules.eval()  # deterministic (no dropout), as our benchmark config

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
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(m.retention.image_conv_channels) - 1)
    return dict(
        sample=torch.randn(batch, m.unet.in_channels, frames, hw, hw, generator=g),
        t=torch.full((batch,), 500, dtype=torch.long),
        ctx=torch.randn(batch, 77, m.unet.cross_attention_dim, generator=g),
        image=torch.randn(batch, 3, hw * f, hw * f, generator=g),
    )


def _matmul_peak(n: int, repeats: int) -> dict:
    import jax

    torch = _torch()
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda x, y: x @ y)
    t_jax = common.median_time(lambda: mm(a, a).block_until_ready(), max(repeats, 5))
    ta = torch.randn(n, n)
    with torch.no_grad():
        t_torch = common.median_time(lambda: ta @ ta, max(repeats, 5))
    flops = 2.0 * n ** 3
    return {"n": n, "jax_flops_per_s": flops / t_jax, "torch_flops_per_s": flops / t_torch}


# ------------------------------------------------------------------------------------------------------------
# Suites.


def suite_train(s, cache) -> dict:
    import jax
    import jax.numpy as jnp

    jb = train_bench(cache, s)
    ours_train = cache["train_step_s"] = jb.time_train(s["repeats"])
    flops = jb.flops()
    text_flops = _text_encoder_flops(jb)

    model = jb.tr.system.model
    fwd = jax.jit(lambda p, x, t, c, i: model.apply({"params": p}, x, t, c, i))
    x = _numpy_batch(jb.config)
    inputs = (jnp.asarray(x["latents"]), jnp.full((s["batch"],), 500, jnp.int32), jnp.asarray(x["context"]),
              jnp.asarray(x["image"]))
    params = jb.model_params()
    ours_fwd = common.median_time(lambda: fwd(params, *inputs).block_until_ready(), s["repeats"])
    del params

    torch = _torch()
    m = jb.config.model
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

    torch_fwd_s = common.median_time(torch_fwd, s["repeats"])
    torch_train_s = common.median_time(torch_step, s["repeats"])
    counts = jb.param_counts()
    n_torch = sum(p.numel() for p in tm.parameters())
    opt.zero_grad(set_to_none=True)
    peak = _matmul_peak(s["matmul"], s["repeats"])
    achieved = flops / ours_train if ours_train > 0 else 0.0
    return {
        "config": dict(channels=list(s["channels"]), layers_per_block=s["layers"], frames=s["frames"],
                       latent=s["hw"], batch=s["batch"], cross_dim=int(m.unet.cross_attention_dim),
                       params_ours=counts["trainable"] + counts["frozen_model"], params_trainable_ours=counts["trainable"],
                       params_torch=int(n_torch), compile_s=jb.compile_s, init_s=jb.init_s),
        "timed": {
            "ours": "Trainer.train_step: timesteps + noise, forward + backward of U-Net and retention branch, MSE, "
                    "AdamW on every model parameter, gradient/parameter norms, and the empty prompt through a "
                    "1-layer text encoder; latents and text embeddings precomputed (no VAE)",
            "torch": "zero_grad, forward of U-Net and ControlNet-style branch, MSE, backward, AdamW on every "
                     "parameter; latents and text embeddings precomputed",
            "forward": "forward alone, no gradients (ours: DreamVideo.apply, jitted)",
        },
        "train_step": common.ratio(ours_train, torch_train_s),
        "forward": common.ratio(ours_fwd, torch_fwd_s),
        "hardware": {
            "train_step_flops": flops,
            "text_encoder_flops": text_flops,
            "achieved_flops_per_s": achieved,
            "matmul_peak_jax_flops_per_s": peak["jax_flops_per_s"],
            "matmul_peak_torch_flops_per_s": peak["torch_flops_per_s"],
            "fraction_of_jax_peak": achieved / peak["jax_flops_per_s"],
            "fraction_of_torch_peak": achieved / peak["torch_flops_per_s"],
            "matmul_n": peak["n"],
        },
    }


def suite_sample(s, cache) -> dict:
    from dreamvideo_jax.sampling.pipeline import Sampler
    from dreamvideo_jax.system import System

    c = s["sample"]
    b, f, hw, steps = c["batch"], c["frames"], c["hw"], c["steps"]
    config = _suite_config(s, sample=True)
    sampler = Sampler(config, System(config).random_params(seed=0), mesh=common.one_device_mesh())
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (b, 8 * hw, 8 * hw, 3), dtype=np.uint8)
    prompts = ["a benchmark prompt"] * b
    kw = dict(num_frames=f, height=8 * hw, width=8 * hw, steps=steps, sampler="ddim",
              image_guidance=GUIDANCE["image"], text_guidance=GUIDANCE["text"])

    t0 = time.perf_counter()
    sampler.sample_latents(images, prompts, seed=0, **kw)
    first_s, first = time.perf_counter() - t0, sampler.timings
    times, recompiles = [], 0
    for r in range(c["repeats"]):
        sampler.sample_latents(images, prompts, seed=r + 1, **kw)
        times.append(sampler.timings.sample_s)
        recompiles += sampler.timings.compiles
    ours_s = statistics.median(times)
    del sampler

    torch = _torch()
    m = config.model
    tm = TorchDreamVideo(m)
    inp = _torch_inputs(m, b, f, hw)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float()
    ts = [t + 1 for t in list(range(0, 1000, 1000 // steps))[::-1]]  # "leading" spacing, offset 1
    ratio_ = 1000 // steps
    null_t = torch.zeros(b, 77, int(m.unet.cross_attention_dim))
    zero_img = torch.zeros_like(inp["image"])
    s_i, s_t = GUIDANCE["image"], GUIDANCE["text"]

    def reference():
        x = inp["sample"].clone()
        with torch.no_grad():
            for t in ts:
                tt = torch.full((b,), t, dtype=torch.long)
                e_u = tm(x, tt, null_t, zero_img)
                e_i = tm(x, tt, null_t, inp["image"])
                e_f = tm(x, tt, inp["ctx"], inp["image"])
                eps = e_u + s_i * (e_i - e_u) + s_t * (e_f - e_i)
                a_t = abar[t]
                a_p = abar[t - ratio_] if t - ratio_ >= 0 else abar[0]
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                x = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps
        return x

    with torch.no_grad():  # warm-up: one forward (a whole sampling run as warm-up cost minutes under load)
        tm(inp["sample"], torch.full((b,), ts[0], dtype=torch.long), inp["ctx"], inp["image"])
    torch_s = common.median_time(reference, c["repeats"], warmup=0)
    out = common.ratio(ours_s, torch_s)
    out.update(ours_first_call_s=first_s, ours_compile_s=first.compile_s, ours_compiles=first.compiles,
               ours_recompiles=recompiles)
    return {"config": dict(channels=list(c["channels"]), layers_per_block=c["layers"], frames=f, latent=hw, batch=b,
                           steps=steps, guidance=f"double (3 branches), image {s_i}, text {s_t}"),
            "timed": {
                "ours": "Sampler.sample_latents, its denoising loop (Timings.sample_s): per step one batched forward "
                        "over the 3 guidance branches + the DDIM update; text encoding and noise excluded",
                "torch": "per step 3 forwards + the DDIM update, on precomputed text embeddings",
            },
            "sample_ddim": out}


def suite_memory(s, cache) -> dict:
    jb = train_bench(cache, s)
    jr = train_bench(cache, s, remat=True)
    base_mem, remat_mem = jb.memory(), jr.memory()
    # Alternate the two steps so that load changes on a shared machine hit both alike.
    jb.time_train(1), jr.time_train(1)  # warm-up (the remat step's first run)
    t_base, t_remat = [], []
    for _ in range(s["repeats"]):
        t_base.append(jb.time_train(1, warmup=0))
        t_remat.append(jr.time_train(1, warmup=0))
    t_base, t_remat = statistics.median(t_base), statistics.median(t_remat)
    remat_compile_s, remat_flops, policy = jr.compile_s, jr.flops(), str(jr.config.model.remat_policy)
    del jr
    fsdp = _fsdp_subprocess()
    return {
        "remat": {
            "policy": policy,
            "temp_bytes_no_remat": base_mem["temp_bytes"], "temp_bytes_remat": remat_mem["temp_bytes"],
            "temp_reduction": base_mem["temp_bytes"] / max(1, remat_mem["temp_bytes"]),
            "time_no_remat_s": t_base, "time_remat_s": t_remat, "time_ratio": t_remat / t_base,
            "flops_no_remat": jb.flops(), "flops_remat": remat_flops, "compile_remat_s": remat_compile_s,
        },
        "fsdp": fsdp,
    }


def _fsdp_subprocess() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    code = "from benchmarks import model; import json; print('FSDP_JSON' + json.dumps(model.fsdp_bytes()))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    for line in res.stdout.splitlines():
        if line.startswith("FSDP_JSON"):
            return json.loads(line[len("FSDP_JSON"):])
    raise RuntimeError(f"FSDP subprocess failed:\n{res.stderr[-3000:]}")


def fsdp_bytes(device_counts=(1, 2, 4, 8)) -> dict:
    """Per-device bytes of the full-size model's parameters + the AdamW moments of its default trainable set under
    FSDP (the trainer's components, shardings and trainable split on abstract shapes; nothing allocated)."""
    import jax

    from configs import modelscope_t2v
    from dreamvideo_jax.parallel import mesh as mesh_lib
    from dreamvideo_jax.parallel import sharding as sh
    from dreamvideo_jax.system import System

    cfg = modelscope_t2v.get_config()
    system = System(cfg)
    rules = mesh_lib.rules_from_config(cfg.sharding)
    abstract = system.model_params(system.abstract)
    trainable, _ = system.split(abstract)

    def shard_bytes(tree, shardings) -> int:
        return sum(int(np.prod(s_.shard_shape(x.shape))) * x.dtype.itemsize
                   for x, s_ in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(shardings)))

    out = {}
    for n in device_counts:
        if n > len(jax.devices()):
            continue
        mesh = mesh_lib.make_mesh({"data": 1, "fsdp": n, "tensor": 1}, devices=jax.devices()[:n])
        shardings = system.model_params(sh.tree_shardings(system.boxed_abstract, mesh, rules,
                                                          int(cfg.sharding.fsdp_min_size)))
        trainable_sh, _ = system.split(shardings)
        p_bytes = shard_bytes(abstract, shardings)
        o_bytes = 2 * shard_bytes(trainable, trainable_sh)  # AdamW mu and nu, sharded like the parameter
        out[str(n)] = {"param_bytes": p_bytes, "opt_bytes": o_bytes, "total_bytes": p_bytes + o_bytes}
    base = out["1"]["total_bytes"]
    for v in out.values():
        v["reduction"] = base / v["total_bytes"]
    return out


def suite_scaling(s, cache) -> dict:
    rows, bytes_at = [], {}  # bytes_at: (frames, latent) -> compiled bytes (or their lower bound)
    # Two sweeps through the bench shape: frames at the bench latent size, latent size at the bench frames.
    sweeps = [[(f, s["hw"], f) for f in s["scaling"]["frames"]],
              [(s["frames"], h, h * h) for h in s["scaling"]["hw"]]]
    for points in sweeps:
        known = []  # (swept size, bytes) of this sweep's points so far
        for f, h, x in points:
            if (f, h) not in bytes_at:
                rows.append(_scaling_point(cache, s, f, h, common.extrapolated_bytes(known, x)))
                bytes_at[(f, h)] = rows[-1].get("compiled_bytes", rows[-1].get("compiled_bytes_at_least"))
            known.append((x, bytes_at[(f, h)]))
    return {"batch": s["batch"], "channels": list(s["channels"]), "points": rows}


def _scaling_point(cache, s, f, h, guess) -> dict:
    """One scaling row: skipped without compiling if the extrapolated bytes `guess` cannot fit, skipped after
    the memory analysis if the compiled bytes cannot, timed otherwise."""
    avail = common.available_bytes()
    if guess is not None and guess > common.MEMORY_HEADROOM * avail:
        return {"frames": f, "latent": h, "compiled_bytes_at_least": int(guess),
                "skipped": common.too_big(guess, avail, extrapolated=True)}
    jb = train_bench(cache, s, f, h)
    mem = jb.memory()
    need = mem["temp_bytes"] + mem["argument_bytes"] + mem["output_bytes"]
    row = {"frames": f, "latent": h, "compiled_bytes": need}
    if need > common.MEMORY_HEADROOM * avail:
        row["skipped"] = common.too_big(need, avail, extrapolated=False)
        return row
    row["flops"] = jb.flops()
    if (f, h) == (s["frames"], s["hw"]) and "train_step_s" in cache:  # the train suite timed this very step
        t = cache["train_step_s"]
        row.update(train_step_s=t, s_per_gflop=t / max(row["flops"], 1) * 1e9, timed_by="train suite")
    else:
        t = jb.time_train(max(1, s["repeats"] - 1))
        row.update(train_step_s=t, s_per_gflop=t / max(row["flops"], 1) * 1e9)
    return row


def suite_fullsize(s, cache) -> dict:
    import jax
    import jax.numpy as jnp

    from configs import modelscope_t2v
    from dreamvideo_jax.diffusion import samplers
    from dreamvideo_jax.training.trainer import Trainer

    cfg = modelscope_t2v.get_config()
    cfg.train.batch_size = 1
    tr = Trainer(cfg, common.one_device_mesh())
    m = cfg.model
    params = tr.abstract_params
    trainable, _ = tr.split(params)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    model_params = tr.system.model_params(params)
    by_part = {k: count(v) for k, v in model_params.items()}

    frames, h = int(cfg.num_frames), int(cfg.height) // 8
    batch = 1
    d = int(m.unet.cross_attention_dim)
    lat = jax.ShapeDtypeStruct((batch, frames, h, h, 4), jnp.float32)
    ctx = jax.ShapeDtypeStruct((batch, 77, d), jnp.float32)
    img = jax.ShapeDtypeStruct((batch, int(cfg.height), int(cfg.width), 3), jnp.float32)
    model = tr.system.model

    def sample_step(p, x, t, c, null, i):
        x3, t3, c3, i3 = samplers.guidance_inputs(x, t, c, null, i)
        u, io, full = samplers.split_guidance_output(model.apply({"params": p}, x3, t3, c3, i3))
        return u + GUIDANCE["image"] * (io - u) + GUIDANCE["text"] * (full - io)

    t0 = time.perf_counter()
    train_lo = common.lower_train_step(tr, tr.abstract_state, tr.abstract_frozen,
                                       {"latents": lat, "context": ctx, "image": img})
    train_flops = common.compiled_flops(train_lo)
    tt = jax.ShapeDtypeStruct((batch,), jnp.int32)
    null = jax.ShapeDtypeStruct((77, d), jnp.float32)
    sample_flops = common.compiled_flops(jax.jit(sample_step).lower(model_params, lat, tt, ctx, null, img))
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
        "params": {"total": count(model_params), "trainable": count(trainable),
                   **{f"part_{k}": v for k, v in by_part.items()},
                   "text_encoder": count(params["text_encoder"]), "vae": count(params["vae"])},
        "flops": {"train_step_per_video": train_flops, "sampling_step_per_video_3_branches": sample_flops,
                  "sampling_25_ddim_per_video": 25 * sample_flops},
        "timed": {"train_step": "the Trainer's step function on precomputed latents and text embeddings (no VAE / "
                                "text encoding of the batch; the empty prompt's encoding included)",
                  "sampling_step": "one forward over the 3 guidance branches + the guidance arithmetic"},
        "tpu_estimates": est,
    }


SUITES = {"train": suite_train, "sample": suite_sample, "memory": suite_memory, "scaling": suite_scaling,
          "fullsize": suite_fullsize}


# ------------------------------------------------------------------------------------------------------------
# Tables.


def print_tables(res: dict) -> None:
    if "train" in res:
        r = res["train"]
        c = r["config"]
        print(f"\n== train: channels {c['channels']} x {c['layers_per_block']} layers, {c['frames']} frames, "
              f"{c['latent']}x{c['latent']} latents, batch {c['batch']}, f32; params ours {c['params_ours']:,} "
              f"({c['params_trainable_ours']:,} trained) / torch {c['params_torch']:,}")
        print(f"  ours:  {r['timed']['ours']}")
        print(f"  torch: {r['timed']['torch']}")
        print(f"{'':14s}{'ours s':>10s}{'torch s':>10s}{'ratio':>8s}")
        for k in ("train_step", "forward"):
            print(f"{k:14s}{r[k]['ours_s']:10.3f}{r[k]['torch_s']:10.3f}{r[k]['ratio']:8.2f}")
        h = r["hardware"]
        print(f"hardware: train step {h['train_step_flops'] / 1e9:.1f} GFLOP (of which the empty prompt's "
              f"text encoding {h['text_encoder_flops'] / 1e9:.2f}), achieved "
              f"{h['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s; {h['matmul_n']}^2 f32 matmul peak JAX "
              f"{h['matmul_peak_jax_flops_per_s'] / 1e9:.1f} / torch {h['matmul_peak_torch_flops_per_s'] / 1e9:.1f} "
              f"GFLOP/s -> {100 * h['fraction_of_jax_peak']:.1f}% of JAX peak, "
              f"{100 * h['fraction_of_torch_peak']:.1f}% of torch peak")
    if "sample" in res:
        r = res["sample"]
        c = r["config"]
        s = r["sample_ddim"]
        print(f"\n== sample: {c['steps']} DDIM steps, {c['guidance']}, channels {c['channels']} x "
              f"{c['layers_per_block']} layers, {c['frames']} frames, {c['latent']}x{c['latent']} latents, "
              f"batch {c['batch']}")
        print(f"  ours:  {r['timed']['ours']}")
        print(f"  torch: {r['timed']['torch']}")
        print(f"ours {s['ours_s']:.2f} s (first call {s['ours_first_call_s']:.1f} s, of which compiling "
              f"{s['ours_compile_s']:.1f} s), torch {s['torch_s']:.2f} s, ratio {s['ratio']:.2f}")
    if "memory" in res:
        r = res["memory"]["remat"]
        print(f"\n== memory: train-step temp bytes no remat {common.gib(r['temp_bytes_no_remat'])}, remat "
              f"({r['policy']}) {common.gib(r['temp_bytes_remat'])} -> {r['temp_reduction']:.2f}x less; time ratio "
              f"remat/no-remat {r['time_ratio']:.2f} ({r['time_no_remat_s']:.3f} -> {r['time_remat_s']:.3f} s), "
              f"FLOPs ratio {r['flops_remat'] / max(r['flops_no_remat'], 1):.2f}")
        print("FSDP (full-size model, per device):")
        print(f"{'devices':>8s}{'params':>14s}{'adamw':>14s}{'total':>14s}{'reduction':>11s}")
        for n, v in res["memory"]["fsdp"].items():
            print(f"{n:>8s}{common.gib(v['param_bytes']):>14s}{common.gib(v['opt_bytes']):>14s}"
                  f"{common.gib(v['total_bytes']):>14s}{v['reduction']:10.2f}x")
    if "scaling" in res:
        r = res["scaling"]
        print(f"\n== scaling (ours, Trainer.train_step, batch {r['batch']}, channels {r['channels']}):")
        print(f"{'frames':>7s}{'latent':>8s}{'step s':>9s}{'GFLOP':>9s}{'ms/GFLOP':>10s}")
        for p in r["points"]:
            if "skipped" in p:
                gflop = f"{p['flops'] / 1e9:9.1f}" if "flops" in p else f"{'-':>9s}"
                print(f"{p['frames']:7d}{p['latent']:8d}{'-':>9s}{gflop}{'-':>10s}  skipped: {p['skipped']}")
                continue
            print(f"{p['frames']:7d}{p['latent']:8d}{p['train_step_s']:9.3f}{p['flops'] / 1e9:9.1f}"
                  f"{p['s_per_gflop'] * 1e3:10.2f}")
    if "fullsize" in res:
        r = res["fullsize"]
        p, f = r["params"], r["flops"]
        print(f"\n== fullsize: modelscope_t2v + retention, {r['config']['height']}px x {r['config']['frames']} frames "
              f"(latents {r['config']['latent']}^2 x 4)")
        print(f"params total {p['total']:,}, trainable {p['trainable']:,} (frozen text encoder {p['text_encoder']:,}, "
              f"VAE {p['vae']:,})")
        print(f"FLOPs/video: train step {f['train_step_per_video'] / 1e12:.2f} T ({r['timed']['train_step']}), "
              f"sampling step (3 branches) {f['sampling_step_per_video_3_branches'] / 1e12:.2f} T, "
              f"25 DDIM {f['sampling_25_ddim_per_video'] / 1e12:.1f} T")
        print(f"TPU estimates at MFU {ASSUMED_MFU:.0%} (bf16 peak/chip: v5p 459 TFLOP/s, v5e 197 TFLOP/s):")
        print(f"{'slice':>9s}{'train step s (1 video/chip)':>29s}{'train videos/s':>16s}{'sample videos/s':>17s}")
        for k, v in r["tpu_estimates"].items():
            print(f"{k:>9s}{v['train_step_s_batch_per_chip_1']:29.3f}{v['train_videos_per_s']:16.1f}"
                  f"{v['sample_videos_per_s']:17.2f}")
