"""What ``python -m dreamvideo_jax.sample`` does, as a library function (:func:`run`) that tests call directly.

Order of work: every argument is checked first (output format, guidance, sizes against the model's
down-sampling factor, image files, prompts file) from the config alone, so a bad flag fails in a second with
one line naming it, before any weights are read or anything is compiled. Then the weights are loaded, the
requests are sampled in batches, and for each request we write:

* ``OUTPUT`` (.mp4 / .gif / .npz) -- all stages joined;
* ``OUTPUT_STEM.png`` -- contact sheet, one row per stage;
* ``OUTPUT_STEM.json`` -- everything needed to reproduce it (prompts, seed, guidance, steps, sampler, weights) plus
  timings and, for chains, the drift of each stage;
* with ``save_latents``: the latents, written as soon as each stage is sampled (before the decode).

With several requests (a prompts file) the outputs are numbered: ``out_000.mp4``, ``out_001.mp4``, ...
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import jax
import ml_collections
import numpy as np

from dreamvideo_jax import checkpoints
from dreamvideo_jax import lora as lora_lib
from dreamvideo_jax.diffusion import schedules
from dreamvideo_jax.errors import CheckpointError
from dreamvideo_jax.models import build as model_build
from dreamvideo_jax.sampling import config as sample_config
from dreamvideo_jax.sampling import inputs
from dreamvideo_jax.sampling import drift, outputs
from dreamvideo_jax.system import MODES, System

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Options:
    """What to read and write (the sample command's flags); every sampling knob is in the config's `sample`
    section, and `overrides` holds the `--config.*` values given on the command line (e.g. `{'sample.steps': 20}`)."""

    output: str | None = None
    image: str | None = None
    last_image: str | None = None  # the video's last frame (first+last-frame video)
    prompt: str = ""
    prompt2: str | None = None
    prompts_file: str | None = None
    workdir: str | None = None
    checkpoint: str | None = None
    step: int | None = None
    ema: bool = True
    random_init: bool = False
    mode: str = "auto"
    save_latents: str | None = None
    batch_size: int = 0
    progress: bool = True
    lora: tuple = ()  # LoRA adapters, 'PATH[:scale]' each, stacked (dreamvideo_jax/lora)
    lora_merge: bool = True  # merge them into the weights at load (False: add them inside every step)
    overrides: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------
# Config and checks


def weights_config(config, *, workdir: str | None = None, checkpoint: str | None = None,
                   random_init: bool = False) -> ml_collections.ConfigDict:
    """The config sampling will use, read cheaply (no weights): the weights' stored config (with `config`'s
    `sample` section when `config` is given), or `config` itself for random weights."""
    if workdir and checkpoint:
        raise inputs.InputError("checkpoint", checkpoint, "give either --workdir or --checkpoint, not both")
    if random_init:
        if workdir or checkpoint:
            raise inputs.InputError("random_init", True, "cannot be combined with --workdir / --checkpoint")
        if config is None or "model" not in config:
            raise inputs.InputError("config", None, "--random_init needs --config (the architecture to initialise)")
        return config
    path, name = (workdir, "workdir") if workdir else (checkpoint, "checkpoint")
    if not path:
        raise inputs.InputError("workdir", None, "give --workdir or --checkpoint with the weights to sample from "
                                            "(or --random_init with --config for a smoke test)")
    stored, _ = checkpoints.read_config(path, config, name)
    return stored


def with_overrides(config, overrides: dict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `sample` section is complete (defaults filled in), with the command line's
    `sample.*` overrides applied and every value checked.

    Raises:
        InputError: naming `--config.sample.<key>` for a bad value or an unknown key.
    """
    c = ml_collections.ConfigDict(config.to_dict())
    try:
        s = sample_config.resolve(c)
    except ValueError as e:
        raise inputs.InputError("config", "(sample section)", str(e)) from None
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section == "sample":
            s[name] = value
    c.sample = s
    check_sample(c)
    return c


def check_sample(config) -> None:
    """Checks the `sample` section against the model (sizes against its down-sampling factor, steps against the
    schedule); raises InputError naming `--config.sample.<key>`."""
    s = config.sample
    k = lambda name: f"config.sample.{name}"  # noqa: E731
    if s.sampler not in sample_config.SAMPLERS:
        raise inputs.InputError(k("sampler"), s.sampler, f"use one of {', '.join(sample_config.SAMPLERS)}")
    if s.loop not in sample_config.LOOPS:
        raise inputs.InputError(k("loop"), s.loop, f"use one of {', '.join(sample_config.LOOPS)}")
    if s.timestep_spacing not in sample_config.SPACINGS:
        raise inputs.InputError(k("timestep_spacing"), s.timestep_spacing,
                           f"use one of {', '.join(sample_config.SPACINGS)}")
    factor = model_build.autoencoder_factor(config.model)
    inputs.check_guidance(k("image_guidance"), s.image_guidance)
    inputs.check_guidance(k("text_guidance"), s.text_guidance)
    nt = int(schedules.section(config.get("diffusion"))["num_train_timesteps"])
    try:
        inputs.check_steps(s.steps, s.sampler, nt, s.timestep_spacing, int(s.steps_offset))
        inputs.check_eta(s.eta, s.sampler)
        inputs.check_seed(s.seed)
        inputs.check_motion_strength(s.motion_strength)
    except inputs.InputError as e:
        raise inputs.InputError(k(e.name), e.value, e.reason) from None
    inputs.check_positive_int(k("num_frames"), s.num_frames or config.get("num_frames", 16), "num_frames")
    inputs.check_size(k("height"), s.height or config.get("height", 256), factor)
    inputs.check_size(k("width"), s.width or config.get("width", 256), factor)
    if float(s.fps) <= 0:
        raise inputs.InputError(k("fps"), s.fps, "must be > 0")
    if int(s.decode_chunk_size) < 0:
        raise inputs.InputError(k("decode_chunk_size"), s.decode_chunk_size, "must be >= 0 (0 = all frames at once)")
    if int(s.stages) < 0:
        raise inputs.InputError(k("stages"), s.stages, "must be >= 0 (0 = one stage per prompt)")
    if s.tokenizer and not os.path.isdir(s.tokenizer):
        raise inputs.InputError(k("tokenizer"), s.tokenizer, "no such directory (a tokenizer folder with vocab.json "
                                                        "and merges.txt)")


def _check_io(opts: Options) -> None:
    if opts.batch_size < 0:
        raise inputs.InputError("batch_size", opts.batch_size, "must be >= 0 (0 = the number of devices)")
    if opts.mode not in ("auto",) + MODES:
        raise inputs.InputError("mode", opts.mode, f"use auto, {' or '.join(MODES)}")
    if opts.save_latents and os.path.splitext(opts.save_latents)[1].lower() != ".npz":
        raise inputs.InputError("save_latents", opts.save_latents, "must be an .npz file")


def _requests(opts: Options, stages: int) -> list[dict]:
    if opts.prompts_file:
        if opts.prompt or opts.prompt2 is not None:
            raise inputs.InputError("prompts_file", opts.prompts_file, "give either --prompts_file or --prompt/--prompt2")
        reqs = inputs.read_prompts_file(opts.prompts_file)
        for r in reqs:
            r["prompts"] = [inputs.check_text("prompts_file", p, f"{opts.prompts_file}: ") for p in r["prompts"]]
    else:
        prompts = [inputs.check_text("prompt", opts.prompt or "")]
        if opts.prompt2 is not None:
            prompts.append(inputs.check_text("prompt2", opts.prompt2))
        reqs = [{"prompts": prompts}]
    if stages:
        for r in reqs:
            if len(r["prompts"]) > stages:
                raise inputs.InputError("config.sample.stages", stages, f"fewer than the {len(r['prompts'])} prompts "
                                                                   "given")
            r["prompts"] = r["prompts"] + [r["prompts"][-1]] * (stages - len(r["prompts"]))
    return reqs


def _output_paths(output: str, n: int) -> list[str]:
    if n == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    digits = max(3, len(str(n - 1)))
    return [f"{stem}_{i:0{digits}d}{ext}" for i in range(n)]


# ------------------------------------------------------------------------------------------------------------
# Run


def load_weights(config, *, workdir: str | None = None, checkpoint: str | None = None, step: int | None = None,
                 ema: bool = True, random_init: bool = False, mode: str | None = None) -> checkpoints.Loaded:
    """The weights to sample from: a workdir or checkpoint path (its stored config, with `config`'s `sample`
    section), or random weights of `config`'s architecture (`random_init`, a smoke test)."""
    if random_init:
        params = System(config, mode).random_params(seed=0)
        return checkpoints.Loaded(config, params, "random weights (--random_init)")
    name = "workdir" if workdir else "checkpoint"
    path = workdir or checkpoint
    loaded = checkpoints.load(path, step=step, use_ema=ema, config=config, name=name)
    loc = checkpoints.locate(path, name) if loaded.step is None else None
    if loc is not None and loc.kind == "workdir":
        base = os.path.join(loc.root, checkpoints.BASE_DIR)
        raise inputs.InputError(name, path, f"has no checkpoint yet, so its weights are the untrained initial ones; "
                                            f"train it first, or sample those weights on purpose with "
                                            f"--checkpoint={base} and its training --config")
    loaded.config.sample = config.sample
    return loaded


def run(opts: Options, config=None, *, mesh=None, echo: Callable[[str], None] = print) -> dict:
    """Samples and writes everything ``opts`` asks for; returns a summary dict.

    Raises:
        InputError: a bad argument (one line naming it), before any weights are loaded where possible.
    """
    inputs.check_output(opts.output)
    _check_io(opts)
    config = weights_config(config, workdir=opts.workdir, checkpoint=opts.checkpoint, random_init=opts.random_init)
    config = with_overrides(config, opts.overrides)
    mode = None if opts.mode == "auto" else opts.mode
    s = config.sample
    num_frames = int(s.num_frames or config.get("num_frames", 16))
    height = int(s.height or config.get("height", 256))
    width = int(s.width or config.get("width", 256))
    reqs = _requests(opts, int(s.stages))

    # Images (read and fitted before any weights are loaded).
    cache: dict[tuple[str, str], np.ndarray] = {}

    def image(path: str, name: str) -> np.ndarray:
        if (path, name) not in cache:
            cache[path, name] = inputs.read_image(path, name)
        return cache[path, name]

    for r in reqs:
        path = r.get("image", opts.image)
        r["image_u8"] = inputs.fit_image(image(path, "image"), height, width, what=path) if path else None
        last = r.get("last_image", opts.last_image)
        r["last_u8"] = None
        if last:
            if s.seamless_loop:
                raise inputs.InputError("last_image", last, "a seamless loop (--config.sample.seamless_loop) ends "
                                        "on the reference image itself; give either --last_image or the loop")
            if not path:
                raise inputs.InputError("last_image", last, "needs a reference image (--image) to start from")
            ref, last_px = image(path, "image"), image(last, "last_image")
            if last_px.shape != ref.shape:
                raise inputs.InputError("last_image", last, f"is {last_px.shape[1]}x{last_px.shape[0]} but the "
                                        f"reference image {path} is {ref.shape[1]}x{ref.shape[0]}: the two keyframes "
                                        "must have the same size")
            r["last_u8"] = inputs.fit_image(last_px, height, width, what=last)

    if (s.seamless_loop or any(r["last_u8"] is not None for r in reqs)) and not (
            s.first_frame_replacement or config.model.retention.get("last_frame", False)):
        name, value = ("config.sample.seamless_loop", True) if s.seamless_loop else ("last_image", opts.last_image)
        raise inputs.InputError(name, value, "these weights were not trained with a last frame "
                                "(model.retention.last_frame is False); add --config.sample.first_frame_replacement"
                                "=true to pin the last frame instead")
    paths = _output_paths(opts.output, len(reqs))
    latent_paths = _output_paths(opts.save_latents, len(reqs)) if opts.save_latents else None
    written = [("output", q) for p in paths for q in (p, os.path.splitext(p)[0] + ".png",
                                                       os.path.splitext(p)[0] + ".json")]
    written += [("save_latents", p) for p in latent_paths or ()]
    read = [("image", r["image"] if r.get("image") else opts.image) for r in reqs] + [("prompts_file",
                                                                                       opts.prompts_file)]
    read += [("last_image", r.get("last_image", opts.last_image)) for r in reqs]
    inputs.check_not_inputs(written, read)

    # Adapters (files read before the weights; checked against the model when the sampler is built).
    adapters = lora_lib.load_all(list(opts.lora or ()))

    # Weights.
    loaded = load_weights(config, workdir=opts.workdir, checkpoint=opts.checkpoint, step=opts.step, ema=opts.ema,
                          random_init=opts.random_init, mode=mode)
    if adapters:
        loaded.source += " + LoRA " + ", ".join(f"{a.source} x{scale:g}" for a, scale in adapters) + (
            " (merged)" if opts.lora_merge else " (unmerged)")
    echo(f"weights: {loaded.source}")
    from dreamvideo_jax.sampling.pipeline import Sampler, Timings

    try:
        sampler = Sampler(loaded.config, loaded.params, mesh=mesh, mode=mode, tokenizer_dir=loaded.tokenizer_dir,
                          lora=adapters, lora_merge=opts.lora_merge)
    except lora_lib.AdapterError:
        raise
    except CheckpointError as e:
        raise inputs.InputError("mode", opts.mode, str(e)) from None
    if any(r["image_u8"] is None for r in reqs) and (sampler.mode == "dreamvideo" or s.first_frame_replacement):
        raise inputs.InputError("image", opts.image, "a reference image is required"
                           + (" for --first_frame_replacement" if sampler.mode == "t2v" else
                              " (DreamVideo animates an image)"))

    batch_size = opts.batch_size or (mesh.size if mesh is not None else jax.local_device_count())
    seed0 = int(s.seed)
    for i, r in enumerate(reqs):
        r["index"] = i
        r.setdefault("seed", seed0 + i)
    total = Timings()
    summary = {"outputs": [], "weights": loaded.source, "mode": sampler.mode}

    # Requests with the same number of stages are sampled together, batch_size at a time; with more than one
    # batch the last one is padded to full size so every batch reuses the same compiled executables.
    groups: dict[int, list[dict]] = {}
    for r in reqs:
        groups.setdefault(len(r["prompts"]), []).append(r)
    for n_stages, group in groups.items():
        chunks = [group[j : j + batch_size] for j in range(0, len(group), batch_size)]
        for chunk in chunks:
            real = len(chunk)
            if len(chunks) > 1:
                chunk = chunk + [chunk[-1]] * (batch_size - real)
            images = None
            if any(r["image_u8"] is not None for r in chunk):
                images = np.stack([r["image_u8"] if r["image_u8"] is not None else np.zeros((height, width, 3),
                                                                                           np.uint8) for r in chunk])
            last_images = None
            if any(r["last_u8"] is not None for r in chunk):
                last_images = [r["last_u8"] for r in chunk]
            prompts = [[r["prompts"][k] for r in chunk] for k in range(n_stages)]
            saved: dict[int, list[np.ndarray]] = {}

            def on_stage(k, lat, video, chunk=chunk, real=real, saved=saved):
                if video is not None or latent_paths is None:
                    return
                saved[k] = lat
                for j, r in enumerate(chunk[:real]):
                    stack = np.stack([saved[q][j] for q in sorted(saved)])
                    outputs.write_latents(latent_paths[r["index"]], stack, seed=np.int64(r["seed"]),
                                          prompts=np.asarray(r["prompts"][: len(saved)]))

            result = sampler.generate_chain(
                images, prompts, seed=[r["seed"] for r in chunk],
                image_guidance=[r.get("image_guidance", s.image_guidance) for r in chunk],
                text_guidance=[r.get("text_guidance", s.text_guidance) for r in chunk],
                num_frames=num_frames, height=height, width=width, progress=opts.progress,
                drop_repeated_frame=bool(s.drop_repeated_frame), on_stage=on_stage, last_images=last_images,
            )  # fmt: skip
            for f in dataclasses.fields(Timings):
                setattr(total, f.name, getattr(total, f.name) + getattr(sampler.timings, f.name))
            for j, r in enumerate(chunk[:real]):
                summary["outputs"].append(_write(paths[r["index"]], r, j, result, config, loaded, sampler, opts, echo))
    summary["timings"] = total.as_dict()
    echo(total.summary())
    return summary


def _write(path: str, r: dict, j: int, result, config, loaded, sampler, opts: Options, echo) -> dict:
    s = config.sample
    video = result.video[j]
    stages = [v[j] for v in result.stages]
    extra = dict(latents=np.stack([lat[j] for lat in result.latents]), references=result.references[j],
                 prompts=np.asarray(r["prompts"]), seed=np.int64(r["seed"]))
    outputs.write_video(path, video, float(s.fps), **extra)
    stem = os.path.splitext(path)[0]
    labels = [f"stage {k + 1}: {p}" for k, p in enumerate(r["prompts"])] if len(stages) > 1 else None
    sheet = outputs.write_contact_sheet(stem + ".png", stages, labels=labels)
    sample_drift = {k: np.asarray(v[j]).tolist() for k, v in result.drift.items()}
    meta = {
        "output": path, "contact_sheet": sheet, "frames": int(video.shape[0]), "height": int(video.shape[1]),
        "width": int(video.shape[2]), "fps": float(s.fps), "prompts": r["prompts"], "image": r.get("image", opts.image),
        "seed": int(r["seed"]), "image_guidance": float(r.get("image_guidance", s.image_guidance)),
        "text_guidance": float(r.get("text_guidance", s.text_guidance)), "steps": int(s.steps),
        "sampler": s.sampler, "eta": float(s.eta), "first_frame_replacement": bool(s.first_frame_replacement),
        "motion_strength": float(s.motion_strength),
        "last_image": r.get("last_image", opts.last_image), "seamless_loop": bool(s.seamless_loop),
        "negative_prompt": s.negative_prompt,
        "mode": sampler.mode, "weights": loaded.source, "prediction_type": sampler.prediction_type,
        "drift": sample_drift, "timings_of_batch": sampler.timings.as_dict(),
    }  # fmt: skip
    target = r["last_u8"] if r.get("last_u8") is not None else (result.references[j, 0] if s.seamless_loop else None)
    if target is not None:
        meta["last_frame_ssim"] = drift.last_frame_ssim(video, target)
    with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    echo(f"wrote {path} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}) and {sheet}")
    if len(stages) > 1:
        echo(drift.format_drift(result.drift, j))
    if target is not None:
        echo(f"last frame vs the {'given last frame' if r.get('last_u8') is not None else 'reference (loop)'}: "
             f"SSIM {meta['last_frame_ssim']:.3f}; loop seam {sample_drift['loop_seam']:.2f}")
    return meta
