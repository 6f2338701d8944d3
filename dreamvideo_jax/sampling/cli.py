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

from dreamvideo_jax.models import build as mb
from dreamvideo_jax.sampling import config as sample_config
from dreamvideo_jax.sampling import inputs as I
from dreamvideo_jax.sampling import metrics, outputs, weights

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Options:
    """Command-line options (``None`` = the config's ``sample`` default)."""

    output: str | None = None
    image: str | None = None
    prompt: str = ""
    prompt2: str | None = None
    stages: int | None = None
    prompts_file: str | None = None
    workdir: str | None = None
    checkpoint: str | None = None
    step: int | None = None
    ema: bool = True
    random_init: bool = False
    mode: str = "auto"
    image_guidance: float | None = None
    text_guidance: float | None = None
    steps: int | None = None
    sampler: str | None = None
    seed: int | None = None
    eta: float | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    first_frame_replacement: bool | None = None
    negative_prompt: str | None = None
    drop_repeated_frame: bool = False
    save_latents: str | None = None
    fps: float | None = None
    decode_chunk_size: int | None = None
    loop: str | None = None
    batch_size: int = 0
    tokenizer: str | None = None
    progress: bool = True


_SAMPLE_FLAGS = ("image_guidance", "text_guidance", "steps", "sampler", "seed", "eta", "num_frames", "height",
                 "width", "first_frame_replacement", "negative_prompt", "fps", "decode_chunk_size", "loop",
                 "tokenizer")


# ------------------------------------------------------------------------------------------------------------
# Config and checks


def _peek_config(opts: Options, config) -> tuple[ml_collections.ConfigDict, str | None]:
    """The config sampling will use, read cheaply (no weights), and the mode it implies."""
    from dreamvideo_jax.training import checkpoint as ck

    if opts.workdir and opts.checkpoint:
        raise I.InputError("checkpoint", opts.checkpoint, "give either --workdir or --checkpoint, not both")
    if opts.random_init:
        if opts.workdir or opts.checkpoint:
            raise I.InputError("random_init", True, "cannot be combined with --workdir / --checkpoint")
        if config is None:
            raise I.InputError("config", None, "--random_init needs --config (the architecture to initialise)")
        return config, config.get("train", {}).get("mode", "dreamvideo")
    path, name = (opts.workdir, "workdir") if opts.workdir else (opts.checkpoint, "checkpoint")
    if not path:
        if config is None:
            raise I.InputError("workdir", None, "give --workdir or --checkpoint (and/or --config)")
        raise I.InputError("workdir", None, "give --workdir or --checkpoint with the weights to sample from "
                                            "(or --random_init for a smoke test)")
    path = path.rstrip("/")
    if "://" not in path and not os.path.exists(path):
        raise I.InputError(name, path, "no such file or directory")
    if ck.is_base(path):
        model_config = ck.read_model_config(path)
        loaded = weights._with_model(config, model_config, "t2v") if config is not None else \
            weights._minimal_config(model_config, "t2v")
        return loaded, None
    root = path
    if os.path.basename(os.path.dirname(path)) == ck.CHECKPOINT_DIR and os.path.basename(path).isdigit():
        root = os.path.dirname(os.path.dirname(path))
    stored = ck.read_workdir_config(root)
    if stored is None or not ck.is_workdir(root):
        raise I.InputError(name, path, "not a training workdir, WORKDIR/checkpoints/<step> or base checkpoint")
    if config is not None and "model" in config:
        from dreamvideo_jax.training import config as tc

        diffs = tc.architecture_diff(stored.to_dict(), config)
        if diffs:
            log.warning("--config's architecture differs from the one stored in %s (%s); using the stored one",
                        root, "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else ""))
    if config is not None and "sample" in config:
        stored.sample = ml_collections.ConfigDict(config.sample.to_dict())
    return stored, stored.get("train", {}).get("mode", "dreamvideo")


def _apply_flags(config, opts: Options) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``sample`` section holds the flags' overrides (checked)."""
    if opts.sampler is not None:
        I.check_sampler(opts.sampler)
    if opts.loop is not None and opts.loop not in sample_config.LOOPS:
        raise I.InputError("loop", opts.loop, f"use one of {', '.join(sample_config.LOOPS)}")
    c = ml_collections.ConfigDict(config.to_dict())
    try:
        s = sample_config.resolve(c)
    except ValueError as e:
        raise I.InputError("config", "(sample section)", str(e)) from None
    for name in _SAMPLE_FLAGS:
        v = getattr(opts, name)
        if v is not None:
            s[name] = v
    c.sample = s
    return c


def _check(config, opts: Options) -> None:
    s = config.sample
    factor = mb.autoencoder_factor(config.model)
    I.check_guidance("image_guidance", s.image_guidance)
    I.check_guidance("text_guidance", s.text_guidance)
    I.check_sampler(s.sampler)
    nt = int(config.get("diffusion", {}).get("num_train_timesteps", 1000))
    I.check_steps(s.steps, s.sampler, nt, s.timestep_spacing, int(s.steps_offset))
    I.check_eta(s.eta, s.sampler)
    I.check_seed(s.seed)
    given = lambda name, default: getattr(opts, name) if getattr(opts, name) is not None else (  # noqa: E731
        s[name] or config.get(name, default))
    I.check_positive_int("num_frames", given("num_frames", 16), "num_frames")
    I.check_size("height", given("height", 256), factor)
    I.check_size("width", given("width", 256), factor)
    if float(s.fps) <= 0:
        raise I.InputError("fps", s.fps, "must be > 0")
    if int(s.decode_chunk_size) < 0:
        raise I.InputError("decode_chunk_size", s.decode_chunk_size, "must be >= 0 (0 = all frames at once)")
    if opts.stages is not None:
        I.check_positive_int("stages", opts.stages, "the number of stages")
    if opts.batch_size < 0:
        raise I.InputError("batch_size", opts.batch_size, "must be >= 0 (0 = the number of devices)")
    if opts.mode not in ("auto",) + weights.MODES:
        raise I.InputError("mode", opts.mode, f"use auto, {' or '.join(weights.MODES)}")
    if s.tokenizer and not os.path.isdir(s.tokenizer):
        raise I.InputError("tokenizer", s.tokenizer, "no such directory (a tokenizer folder with vocab.json and "
                                                     "merges.txt)")
    if opts.save_latents and os.path.splitext(opts.save_latents)[1].lower() != ".npz":
        raise I.InputError("save_latents", opts.save_latents, "must be an .npz file")


def _requests(opts: Options) -> list[dict]:
    if opts.prompts_file:
        if opts.prompt or opts.prompt2 is not None:
            raise I.InputError("prompts_file", opts.prompts_file, "give either --prompts_file or --prompt/--prompt2")
        reqs = I.read_prompts_file(opts.prompts_file)
    else:
        prompts = [opts.prompt or ""]
        if opts.prompt2 is not None:
            prompts.append(opts.prompt2)
        reqs = [{"prompts": prompts}]
    if opts.stages is not None:
        for r in reqs:
            if len(r["prompts"]) > opts.stages:
                raise I.InputError("stages", opts.stages, f"fewer than the {len(r['prompts'])} prompts given")
            r["prompts"] = r["prompts"] + [r["prompts"][-1]] * (opts.stages - len(r["prompts"]))
    return reqs


def _output_paths(output: str, n: int) -> list[str]:
    if n == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    digits = max(3, len(str(n - 1)))
    return [f"{stem}_{i:0{digits}d}{ext}" for i in range(n)]


# ------------------------------------------------------------------------------------------------------------
# Run


def run(opts: Options, config=None, *, mesh=None, echo: Callable[[str], None] = print) -> dict:
    """Samples and writes everything ``opts`` asks for; returns a summary dict.

    Raises:
        InputError: a bad argument (one line naming it), before any weights are loaded where possible.
    """
    I.check_output(opts.output)
    config, mode = _peek_config(opts, config)
    config = _apply_flags(config, opts)
    _check(config, opts)
    mode = None if opts.mode == "auto" else opts.mode
    s = config.sample
    num_frames = int(s.num_frames or config.get("num_frames", 16))
    height = int(s.height or config.get("height", 256))
    width = int(s.width or config.get("width", 256))
    reqs = _requests(opts)

    # Images (read and fitted before any weights are loaded).
    cache: dict[str, np.ndarray] = {}
    for r in reqs:
        path = r.get("image", opts.image)
        if path:
            if path not in cache:
                cache[path] = I.load_image(path, height, width)
            r["image_u8"] = cache[path]
        else:
            r["image_u8"] = None

    # Weights.
    if opts.random_init:
        variables = weights.random_variables(config, seed=0, mode=mode)
        loaded = weights.Loaded(config, variables, "random weights (--random_init)")
    else:
        loaded = weights.load(workdir=opts.workdir, checkpoint=opts.checkpoint, step=opts.step, use_ema=opts.ema,
                              config=config)
        loaded.config.sample = config.sample
    echo(f"weights: {loaded.source}")
    from dreamvideo_jax.sampling.pipeline import Sampler, Timings

    try:
        sampler = Sampler(loaded.config, loaded.variables, mesh=mesh, mode=mode, tokenizer_dir=loaded.tokenizer_dir)
    except ValueError as e:
        raise I.InputError("mode", opts.mode, str(e)) from None
    if any(r["image_u8"] is None for r in reqs) and (sampler.mode == "dreamvideo" or s.first_frame_replacement):
        raise I.InputError("image", opts.image, "a reference image is required"
                           + (" for --first_frame_replacement" if sampler.mode == "t2v" else
                              " (DreamVideo animates an image)"))

    paths = _output_paths(opts.output, len(reqs))
    latent_paths = _output_paths(opts.save_latents, len(reqs)) if opts.save_latents else None
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
                drop_repeated_frame=opts.drop_repeated_frame, on_stage=on_stage,
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
    sheet = outputs.write_contact_sheet(stem + ".png", stages)
    drift = {k: np.asarray(v[j]).tolist() for k, v in result.drift.items()}
    meta = {
        "output": path, "contact_sheet": sheet, "frames": int(video.shape[0]), "height": int(video.shape[1]),
        "width": int(video.shape[2]), "fps": float(s.fps), "prompts": r["prompts"], "image": r.get("image", opts.image),
        "seed": int(r["seed"]), "image_guidance": float(r.get("image_guidance", s.image_guidance)),
        "text_guidance": float(r.get("text_guidance", s.text_guidance)), "steps": int(s.steps),
        "sampler": s.sampler, "eta": float(s.eta), "first_frame_replacement": bool(s.first_frame_replacement),
        "negative_prompt": s.negative_prompt,
        "mode": sampler.mode, "weights": loaded.source, "prediction_type": sampler.prediction_type,
        "drift": drift, "timings_of_batch": sampler.timings.as_dict(),
    }  # fmt: skip
    with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    echo(f"wrote {path} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]}) and {sheet}")
    if len(stages) > 1:
        echo(metrics.format_drift(result.drift, j))
    return meta
