r"""The moving-shapes demo: the paper's recipe at toy scale, on a CPU, in minutes.

  python -m dreamvideo_jax.demo --workdir=runs/demo

1. Stage 1 trains a text-to-video base (the primary 3D U-Net, all layers) on `moving_shapes`
   (`WORKDIR/stage1_t2v`).
2. Stage 2 copies the base's encoder into the Image Retention branch, freezes the spatial layers and trains
   DreamVideo (`WORKDIR/stage2_dreamvideo`; sample from it with
   `python -m dreamvideo_jax.sample --config=configs/demo_shapes.py --workdir=WORKDIR/stage2_dreamvideo ...`).
3. Sampling on held-out images (shape/colour/motion combinations never seen in training): every image with
   every motion prompt; one image with different prompts side by side; a two-stage video with two plots; an
   image-guidance sweep; a motion-strength sweep (`sample.motion_strength` at 0, 0.25, 0.5, 0.75, 1). The
   stage-1 base does image-to-video by first-frame replacement, for comparison.
4. Metrics (`WORKDIR/metrics.json`): motion-direction accuracy (centroid tracked over frames vs the prompt),
   FFF_SSIM (first generated frame vs the input image), identity retention (colour and size kept), for
   DreamVideo and for the base; per motion strength the mean object displacement and the same metrics, and the
   Spearman correlation of displacement with the knob (`motion_strength_spearman`); plus wall time. Videos
   (GIF/MP4) and one PNG contact sheet.

A second run reuses the trained checkpoints (training resumes at the last step, i.e. does nothing).
On a CPU-only machine the batches are split over one XLA device per core (`--cpu_devices`): XLA:CPU runs each
convolution on one core, so a single device leaves the others mostly idle (parallel/host_cpu.py).
"""

from __future__ import annotations

import logging
import os
import time

from absl import flags
import numpy as np

from dreamvideo_jax import command

flags.DEFINE_string("workdir", "runs/demo", "Output folder (checkpoints, videos, metrics).")
flags.DEFINE_string("config", "configs/demo_shapes.py", "The demo's config file (its get_config('t2v') is stage 1).")
flags.DEFINE_integer("stage1_steps", None, "Override stage-1 training steps.")
flags.DEFINE_integer("stage2_steps", None, "Override stage-2 training steps.")
flags.DEFINE_integer("sample_steps", None, "Override sampling steps.")
flags.DEFINE_integer("num_images", 8, "Held-out test images, each animated with every motion prompt.")
flags.DEFINE_bool("progress", True, "Progress bars.")
flags.DEFINE_integer("cpu_devices", 0, "On a CPU-only machine, XLA devices to split each batch over: 0 = one per core "
                     "(a power of two, at most 8; parallel/host_cpu.py), 1 = a single device. An explicit "
                     "--xla_force_host_platform_device_count in XLA_FLAGS wins.")
FLAGS = flags.FLAGS

STAGE1, STAGE2 = "stage1_t2v", "stage2_dreamvideo"
# The motion-strength sweep's knob values (sample.motion_strength).
MOTION_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
log = logging.getLogger("dreamvideo_jax.demo")


def _load_config_module(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_config", path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"--config: no config file at {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_configs(config_path: str, workdir: str, stage1_steps=None, stage2_steps=None):
    """The two training configs, with the data built under `workdir/data` and stage 2 initialised from stage 1."""
    module = _load_config_module(config_path)
    c1, c2 = module.get_config("t2v"), module.get_config()
    for c in (c1, c2):
        c.data.data_dir = os.path.join(workdir, "data")
    c2.init_from = os.path.join(workdir, STAGE1)
    if stage1_steps is not None:
        c1.train.num_steps = stage1_steps
    if stage2_steps is not None:
        c2.train.num_steps = stage2_steps
    for c in (c1, c2):
        c.train.checkpoint_every = min(int(c.train.checkpoint_every), max(1, int(c.train.num_steps)))
    return c1, c2


def held_out_examples(config, num_images: int) -> dict:
    """First frames + metadata of `num_images` clips of the test split (held-out shape/colour/motion combinations),
    one per distinct (shape, colour) where possible."""
    from dreamvideo_jax.data.pipeline import make_eval_iterator

    cfg = config.data
    it = make_eval_iterator(cfg, batch_size=64, split="test", with_captions=True, with_metadata=True)
    images, shapes, colours, seen = [], [], [], set()
    last_frames, clip_captions = [], []
    spare = []
    for batch in it:
        for i in np.flatnonzero(batch["mask"]):
            key = (_text(batch["shape"][i]), _text(batch["colour"][i]))
            image = np.round((batch["image"][i] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
            (spare if key in seen else images).append(image)
            if key not in seen:
                last_frames.append(np.round((batch["video"][i, -1] + 1.0) * 127.5).clip(0, 255).astype(np.uint8))
                clip_captions.append(_text(batch["caption"][i]))
                shapes.append(key[0])
                colours.append(key[1])
                seen.add(key)
            if len(images) >= num_images:
                break
        if len(images) >= num_images:
            break
    if hasattr(it, "close"):
        it.close()
    return {"images": np.stack(images), "shapes": shapes, "colours": colours,
            "last_frames": np.stack(last_frames), "captions": clip_captions}


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _metrics(videos, captions, images) -> dict:
    from dreamvideo_jax.evaluation.shapes import shapes_metrics

    m = shapes_metrics(videos, captions, images)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}


def run(workdir: str, config_path: str = "configs/demo_shapes.py", *, stage1_steps=None, stage2_steps=None,
        sample_steps=None, num_images: int = 8, progress: bool = True) -> dict:
    """Runs (or resumes) the whole demo; returns the metrics written to `workdir/metrics.json`, or None when a
    training stage was stopped on request (SIGTERM / Ctrl-C: it saved a checkpoint, and a rerun resumes)."""
    import jax

    from scipy import stats

    from dreamvideo_jax.data.moving_shapes import MOTIONS, caption_for
    from dreamvideo_jax.evaluation.shapes import displacement
    from dreamvideo_jax.sampling import drift, outputs
    from dreamvideo_jax import checkpoints
    from dreamvideo_jax.sampling.pipeline import Sampler
    from dreamvideo_jax.training.loop import train_and_evaluate

    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    c1, c2 = stage_configs(config_path, workdir, stage1_steps, stage2_steps)
    for c in (c1, c2):
        c.train.progress_bar = progress
    timings = {}

    for name, cfg in ((STAGE1, c1), (STAGE2, c2)):
        t0 = time.perf_counter()
        log.info("%s: training %d steps (resumes if already trained)", name, cfg.train.num_steps)
        result = train_and_evaluate(cfg, os.path.join(workdir, name))
        timings[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        timings[f"{name}_source"] = result.source
        timings[f"{name}_steps"] = int(result.step)
        if result.preempted:  # stopped on request: nothing is sampled from a half-trained stage
            log.warning("%s stopped at step %d of %d on request (checkpoint saved); run the same command again to "
                        "resume", name, result.step, cfg.train.num_steps)
            return None

    t0 = time.perf_counter()
    held = held_out_examples(c2, num_images)
    images, n = held["images"], len(held["images"])
    captions = [caption_for(s, c, m) for s, c in zip(held["shapes"], held["colours"]) for m in MOTIONS]
    grid_images = np.repeat(images, len(MOTIONS), axis=0)
    kw = {} if sample_steps is None else {"steps": sample_steps}

    stage2 = checkpoints.load(os.path.join(workdir, STAGE2))
    dv = Sampler(stage2.config, stage2.params)
    dv_videos = dv.generate(grid_images, captions, progress=progress, **kw)
    stage1 = checkpoints.load(os.path.join(workdir, STAGE1))
    base = Sampler(stage1.config, stage1.params, mode="t2v")
    base_videos = base.generate(grid_images, captions, first_frame_replacement=True, progress=progress, **kw)

    metrics = {
        "direction_accuracy": None, "fff_ssim": None, "wall_seconds": None,  # filled below, listed first
        "dreamvideo": _metrics(dv_videos, captions, grid_images),
        "base_t2v_first_frame_replacement": _metrics(base_videos, captions, grid_images),
    }
    metrics["direction_accuracy"] = metrics["dreamvideo"]["direction_accuracy"]
    metrics["fff_ssim"] = metrics["dreamvideo"]["fff_ssim"]
    metrics["identity_retention"] = metrics["dreamvideo"]["identity_retention"]

    # One image, every prompt, side by side; a two-stage video; an image-guidance sweep.
    out = os.path.join(workdir, "videos")
    os.makedirs(out, exist_ok=True)
    first = slice(0, len(MOTIONS))
    side_by_side = np.concatenate(list(dv_videos[first]), axis=2)  # frames: prompts side by side
    outputs.write_gif(os.path.join(out, "one_image_all_prompts.gif"), side_by_side)
    outputs.write_mp4(os.path.join(out, "one_image_all_prompts.mp4"), side_by_side)
    shape0, colour0 = held["shapes"][0], held["colours"][0]
    plots = [caption_for(shape0, colour0, "right"), caption_for(shape0, colour0, "down")]
    chain = dv.generate_chain(images[:1], plots, progress=progress, **kw)
    outputs.write_gif(os.path.join(out, "two_stage.gif"), chain.video[0])
    outputs.write_mp4(os.path.join(out, "two_stage.mp4"), chain.video[0])
    sweep_scales = (0.0, 1.0, 1.5, 3.0)
    sweep_caption = caption_for(shape0, colour0, "left")
    sweep = dv.generate(np.repeat(images[:1], len(sweep_scales), 0), [sweep_caption] * len(sweep_scales),
                        image_guidance=list(sweep_scales), progress=progress, **kw)
    outputs.write_gif(os.path.join(out, "image_guidance_sweep.gif"), np.concatenate(list(sweep), axis=2))
    metrics["image_guidance_sweep"] = {
        str(s): _metrics(sweep[i:i + 1], [sweep_caption], images[:1])["fff_ssim"] for i, s in enumerate(sweep_scales)}
    # Motion strength: the first image with every motion prompt at each knob value; mean object displacement
    # (first to last frame, pixels) should rise with the knob.
    strength_videos = {}
    for value in MOTION_STRENGTHS:
        videos = dv.generate(np.repeat(images[:1], len(MOTIONS), 0), captions[first], motion_strength=value,
                             progress=progress, **kw)
        strength_videos[value] = videos
        moved = [d for d in (displacement(v) for v in videos) if d is not None]
        metrics.setdefault("motion_strength", {})[str(value)] = {
            "mean_displacement_px": round(float(np.mean([np.hypot(*d) for d in moved])), 4) if moved else None,
            "tracked": len(moved), **_metrics(videos, captions[first], images[:1].repeat(len(MOTIONS), 0))}
    means = [metrics["motion_strength"][str(v)]["mean_displacement_px"] for v in MOTION_STRENGTHS]
    rho = float(stats.spearmanr(MOTION_STRENGTHS, means).statistic) if None not in means else float("nan")
    metrics["motion_strength_spearman"] = round(rho, 4) if np.isfinite(rho) else None  # None: undefined
    outputs.write_gif(os.path.join(out, "motion_strength_sweep.gif"),
                      np.concatenate([strength_videos[v][MOTIONS.index("right")] for v in MOTION_STRENGTHS], axis=2))
    # Keyframes: each held-out image with its own clip's caption and last frame (first+last-frame videos), and
    # as seamless loops (the last frame = the image); scored against the given last frame and by the loop seam.
    n_key = min(n, 4)
    first_last = dv.generate(images[:n_key], held["captions"][:n_key], last_images=list(held["last_frames"][:n_key]),
                             progress=progress, **kw)
    loops = dv.generate(images[:n_key], held["captions"][:n_key], seamless_loop=True, progress=progress, **kw)
    plain = dv.generate(images[:n_key], held["captions"][:n_key], progress=progress, **kw)
    loop_seam = lambda videos: [drift.seam_scores(v, [])[1] for v in videos]  # noqa: E731
    metrics["first_last"] = {
        "last_frame_ssim": _mean([drift.last_frame_ssim(v, t) for v, t in zip(first_last, held["last_frames"])]),
        "last_frame_ssim_without_last_image": _mean([drift.last_frame_ssim(v, t) for v, t in
                                                     zip(plain, held["last_frames"])]),
        **_metrics(first_last, held["captions"][:n_key], images[:n_key])}
    metrics["loop"] = {"loop_seam": _mean(loop_seam(loops)), "loop_seam_without_loop": _mean(loop_seam(plain)),
                       "last_frame_ssim_to_image": _mean([drift.last_frame_ssim(v, im) for v, im in
                                                          zip(loops, images)])}
    metrics["last_frame_ssim"] = metrics["first_last"]["last_frame_ssim"]
    metrics["loop_seam"] = metrics["loop"]["loop_seam"]
    outputs.write_gif(os.path.join(out, "first_last_and_loop.gif"),
                      np.concatenate([first_last[0], loops[0], plain[0]], axis=2))
    metrics["two_stage"] = {"prompts": plots, "drift": _jsonable(chain.drift),
                            "reference_is_last_frame": bool(np.array_equal(chain.references[0, 1],
                                                                           chain.stages[0][0, -1]))}

    # Contact sheet: rows = (input image + DreamVideo frames, base frames) for each prompt of the first image,
    # then the two-stage video and the sweep.
    def row(video, image):
        return np.concatenate([image[None], video])  # the input image, then the generated frames

    rows = []
    for j in range(len(MOTIONS)):
        rows.append(row(dv_videos[j], images[0]))
    rows.append(row(base_videos[len(MOTIONS) - 1], images[0]))
    rows.append(row(chain.video[0], images[0]))
    for v in sweep:
        rows.append(row(v, images[0]))
    for value in MOTION_STRENGTHS:
        rows.append(row(strength_videos[value][MOTIONS.index("right")], images[0]))
    rows.append(np.concatenate([row(first_last[0], images[0]), held["last_frames"][:1]]))
    rows.append(row(loops[0], images[0]))
    labels = ([f"DreamVideo: {captions[j]}" for j in range(len(MOTIONS))]
              + [f"base, first-frame replacement: {captions[len(MOTIONS) - 1]}", "two-stage: " + " | ".join(plots)]
              + [f"image guidance {s}: {sweep_caption}" for s in sweep_scales]
              + [f"motion strength {v}: {captions[MOTIONS.index('right')]}" for v in MOTION_STRENGTHS]
              + [f"first+last frame (given last frame at the end): {held['captions'][0]}",
                 f"seamless loop: {held['captions'][0]}"])
    outputs.write_contact_sheet(os.path.join(workdir, "contact_sheet.png"), rows, labels=labels)
    timings["sampling_seconds"] = round(time.perf_counter() - t0, 1)

    metrics["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    metrics["timings"] = timings
    metrics["setup"] = {
        "devices": jax.device_count(), "held_out_images": n, "prompts_per_image": len(MOTIONS),
        "videos": len(captions),
        "sampler": stage2.config.sample.sampler, "steps": int(kw.get("steps", stage2.config.sample.steps)),
        "text_guidance": float(stage2.config.sample.text_guidance), "image_guidance": float(stage2.config.sample.image_guidance),
        "contact_sheet_rows": labels,  # each row: the first test image, then the generated frames
    }
    outputs.write_json(os.path.join(workdir, "metrics.json"), metrics)
    return metrics


def _mean(values) -> float | None:
    values = [float(v) for v in values if np.isfinite(v)]
    return round(float(np.mean(values)), 4) if values else None


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def main(argv):
    del argv
    from dreamvideo_jax.parallel.host_cpu import use_one_device_per_core

    use_one_device_per_core(FLAGS.cpu_devices)  # before anything imports jax
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    m = run(FLAGS.workdir, FLAGS.config, stage1_steps=FLAGS.stage1_steps, stage2_steps=FLAGS.stage2_steps,
            sample_steps=FLAGS.sample_steps, num_images=FLAGS.num_images, progress=FLAGS.progress)
    if m is None:
        print(f"stopped on request; training resumes from the saved checkpoint when the same command runs again "
              f"(workdir {FLAGS.workdir})")
        return
    dv, base = m["dreamvideo"], m["base_t2v_first_frame_replacement"]
    print(f"DreamVideo: direction accuracy {dv['direction_accuracy']:.3f}, FFF_SSIM {dv['fff_ssim']:.3f}, "
          f"identity {dv['identity_retention']:.3f}")
    print(f"base (t2v + first-frame replacement): direction accuracy {base['direction_accuracy']:.3f}, "
          f"FFF_SSIM {base['fff_ssim']:.3f}, identity {base['identity_retention']:.3f}")
    print(f"wall {m['wall_seconds']:.0f} s; outputs in {FLAGS.workdir} (metrics.json, contact_sheet.png, videos/)")


if __name__ == "__main__":
    command.run(main)
