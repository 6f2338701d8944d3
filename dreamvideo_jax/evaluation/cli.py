"""What ``python -m dreamvideo_jax.evaluate`` does, as a library function (:func:`evaluate`) that tests call directly.

For each of the first ``num_samples`` clips of an evaluation split (a deterministic pass, clips start at frame 0)
we generate a video from the clip's first frame and caption, and stream (real clip, generated clip, caption) into
a :class:`~dreamvideo_jax.evaluation.suite.MetricSuite`. Every metric whose reference network is available is
computed; the others are listed under ``skipped`` with the reason.

Datasets (``dataset=``):

* ``moving_shapes`` -- the synthetic dataset (built into ``config.data.data_dir`` on first use); the
  moving-shapes metrics (direction, identity, colour) are added;
* ``video_folder`` -- a build of ``python -m dreamvideo_jax.data.build --dataset=video_folder`` (the only build
  in the data dir, or ``config_name=``);
* ``ucf101`` / ``msrvtt`` -- ``video_folder`` builds named ``ucf101`` / ``msrvtt``, e.g.::

      python -m dreamvideo_jax.data.build --dataset=video_folder --config_name=ucf101 --source_dir=UCF-101 \\
          --caption_from=class --class_names=ucf101 --data_dir=DATA
      python -m dreamvideo_jax.data.build --dataset=video_folder --config_name=msrvtt --source_dir=MSRVTT \\
          --data_dir=DATA

  (``config_name=`` chooses another build name).

Resuming: after every batch the suite's state is saved to ``OUTPUT.state.npz`` and the settings that produced
it to ``OUTPUT.state.json``. A rerun with the same settings continues after the last saved clip; any
``num_samples`` at least as large as what is done may be asked (so N can also be raised later). Per-clip seeds
are ``seed + clip index``, so a resumed run gives the same numbers as an uninterrupted one. A state written
with other settings is refused (``restart=True`` discards it).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import ml_collections
import numpy as np

from dreamvideo_jax.sampling import inputs as I
from dreamvideo_jax.sampling.outputs import write_json

log = logging.getLogger(__name__)

# --dataset -> (config.data.dataset, build name; None = config.data.config_name or the only build present).
DATASETS = {
    "moving_shapes": ("moving_shapes", None),
    "video_folder": ("video_folder", None),
    "ucf101": ("video_folder", "ucf101"),
    "msrvtt": ("video_folder", "msrvtt"),
}
STATE_VERSION = 1


def state_paths(output: str) -> tuple[str, str]:
    """``(suite state .npz, settings .json)`` kept next to ``output`` while (and after) evaluating."""
    return output + ".state.npz", output + ".state.json"


class _Offset:
    """A random-access source whose record ``i`` is ``source[start + i]`` (resuming mid-split)."""

    def __init__(self, source, start: int):
        self.source, self.start = source, int(start)

    def __len__(self) -> int:
        return max(0, len(self.source) - self.start)

    def __getitem__(self, i):
        return self.source[self.start + int(i)]


def _data_config(config, user_config, *, dataset, data_dir, config_name, split, num_frames, height, width):
    base = user_config if (user_config is not None and "data" in user_config) else config
    if "data" not in base:
        from dreamvideo_jax.data import config as data_config

        data = data_config.defaults()
    else:
        data = ml_collections.ConfigDict(base.data.to_dict())
    kind, name = DATASETS[dataset]
    if kind != data.get("dataset"):
        data.config_name = ""  # the config's build name belongs to another dataset
    data.dataset = kind
    if name is not None:
        data.config_name = name
    if config_name:
        data.config_name = config_name
    if data_dir:
        data.data_dir = data_dir
    if split:
        data.eval_split = split
    # Real clips at the generated size, uint8, one deterministic pass.
    data.num_frames, data.height, data.width = int(num_frames), int(height), int(width)
    data.as_uint8 = True
    data.worker_count = 0
    data.shuffle = False
    return data


def evaluate(config=None, workdir: str | None = None, *, dataset: str, num_samples: int, output: str,
             checkpoint: str | None = None, step: int | None = None, use_ema: bool = True,
             random_init: bool = False, mode: str = "auto", data_dir: str | None = None,
             config_name: str | None = None, split: str | None = None, batch_size: int = 0,
             seed: int | None = None, sampler: str | None = None, steps: int | None = None,
             image_guidance: float | None = None, text_guidance: float | None = None, eta: float | None = None,
             num_frames: int | None = None, height: int | None = None, width: int | None = None,
             first_frame_replacement: bool | None = None, c3d_weights: str | None = None,
             clip_model: str | None = None, i3d=True, shapes: bool | None = None, metric_batch_size: int = 8,
             restart: bool = False, progress: bool = True, mesh=None,
             on_batch: Callable[[int], None] | None = None, echo: Callable[[str], None] = print) -> dict:
    """Generates from the first ``num_samples`` clips of ``dataset`` and writes the metrics to ``output`` (.json).

    Unset sampling arguments take the config's ``sample`` defaults; ``batch_size=0`` = the number of devices.
    ``shapes=None`` adds the moving-shapes metrics for ``dataset='moving_shapes'``. ``on_batch(clips_done)`` is
    called after each saved batch. Returns what is written to ``output``.

    Raises:
        InputError: a bad argument, a missing workdir or dataset build, or a saved state of other settings
          (one line naming the flag), before any weights are loaded where possible.
    """
    from dreamvideo_jax.sampling import cli as sample_cli

    # ---- arguments (no weights, no data read yet)
    if not output or os.path.splitext(output)[1].lower() != ".json":
        raise I.InputError("output", output, "give a .json file for the metrics")
    if dataset not in DATASETS:
        raise I.InputError("dataset", dataset, f"use one of {', '.join(DATASETS)}")
    I.check_positive_int("num_samples", num_samples, "the number of clips to evaluate")
    if batch_size < 0:
        raise I.InputError("batch_size", batch_size, "must be >= 0 (0 = the number of devices)")
    if metric_batch_size <= 0:
        raise I.InputError("metric_batch_size", metric_batch_size, "must be > 0")
    opts = sample_cli.Options(output="x.mp4", workdir=workdir, checkpoint=checkpoint, step=step, ema=use_ema,
                              random_init=random_init, mode=mode, image_guidance=image_guidance,
                              text_guidance=text_guidance, steps=steps, sampler=sampler, seed=seed, eta=eta,
                              num_frames=num_frames, height=height, width=width,
                              first_frame_replacement=first_frame_replacement, progress=progress)  # fmt: skip
    user_config = config
    config, _ = sample_cli._peek_config(opts, config)
    config = sample_cli._apply_flags(config, opts)
    sample_cli._check(config, opts)
    s = config.sample
    frames = int(s.num_frames or config.get("num_frames", 16))
    height = int(s.height or config.get("height", 256))
    width = int(s.width or config.get("width", 256))
    data_cfg = _data_config(config, user_config, dataset=dataset, data_dir=data_dir, config_name=config_name,
                            split=split, num_frames=frames, height=height, width=width)
    shapes = (dataset == "moving_shapes") if shapes is None else bool(shapes)
    split = data_cfg.eval_split

    from dreamvideo_jax.data import pipeline as dp

    try:
        source = dp.open_source(data_cfg, split)
    except FileNotFoundError as e:
        hint = ""
        if DATASETS[dataset][1] is not None and not config_name:
            hint = (f" (--dataset={dataset} reads the video_folder build named {DATASETS[dataset][1]!r}: build it "
                    f"with --config_name={DATASETS[dataset][1]}, or pass --config_name)")
        raise I.InputError("dataset", dataset, str(e) + hint) from None
    except ValueError as e:  # e.g. a split the build does not have
        raise I.InputError("split", split, str(e)) from None
    build_name = os.path.basename(os.path.dirname(dp.dataset_path(data_cfg)))
    if len(source) < num_samples:
        raise I.InputError("num_samples", num_samples, f"the {split!r} split of {dataset} has {len(source)} clips")

    # ---- metrics and saved state
    from dreamvideo_jax.evaluation.i3d import MIN_FRAMES
    from dreamvideo_jax.evaluation.suite import MetricSuite

    short = i3d is True and frames < MIN_FRAMES  # known now: do not load I3D for nothing
    suite = MetricSuite(i3d=False if short else i3d, c3d_weights=c3d_weights, clip_model=clip_model,
                        shapes=shapes, batch_size=metric_batch_size)
    if short:
        suite.skipped["fvd"] = f"clips have {frames} frames; I3D needs >= {MIN_FRAMES} (16 is standard)"
    settings = {
        "version": STATE_VERSION, "dataset": dataset, "data_dataset": data_cfg.dataset,
        "config_name": build_name, "data_dir": dp.resolve_data_dir(data_cfg), "split": split,
        "frames": frames, "resolution": [height, width], "stride": int(data_cfg.get("frame_stride", 1)),
        "sampler": s.sampler, "steps": int(s.steps), "eta": float(s.eta), "image_guidance": float(s.image_guidance),
        "text_guidance": float(s.text_guidance), "seed": int(s.seed), "timestep_spacing": s.timestep_spacing,
        "first_frame_replacement": bool(s.first_frame_replacement), "negative_prompt": s.negative_prompt,
        "mode": mode, "workdir": workdir, "checkpoint": checkpoint, "step": step, "ema": bool(use_ema),
        "random_init": bool(random_init), "metrics": suite.settings,
    }  # fmt: skip
    state_npz, state_json = state_paths(output)
    done = 0
    saved: dict = {}
    if restart:
        for p in (state_npz, state_json):
            if os.path.exists(p):
                os.remove(p)
    elif os.path.exists(state_json) and os.path.exists(state_npz):
        with open(state_json) as f:
            saved = json.load(f)
        if saved.get("settings") != settings:
            diff = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                          if settings.get(k) != saved.get("settings", {}).get(k))
            raise I.InputError("output", output, f"{state_json} holds an evaluation with other settings (differ: "
                                                 f"{', '.join(diff)}); rerun with those, or --restart to discard it")
        suite.load(state_npz)
        done = suite.num
        if done > num_samples:
            raise I.InputError("num_samples", num_samples, f"{state_json} already holds {done} clips; ask for at "
                                                           "least that many, or --restart")
        echo(f"resuming after {done} of {num_samples} clips ({state_npz})")

    # ---- weights
    from dreamvideo_jax.sampling import weights
    from dreamvideo_jax.sampling.pipeline import Sampler

    run_mode = None if mode == "auto" else mode
    loaded_step, source_desc = saved.get("checkpoint_step"), saved.get("weights")
    if done < num_samples:
        if random_init:
            variables = weights.random_variables(config, seed=0, mode=run_mode)
            loaded = weights.Loaded(config, variables, "random weights (random_init)")
        else:
            loaded = weights.load(workdir=workdir, checkpoint=checkpoint, step=step, use_ema=use_ema, config=config)
            loaded.config.sample = config.sample
        if done and saved.get("checkpoint_step") is not None and loaded.step != saved["checkpoint_step"]:
            raise I.InputError("step", step, f"the saved state was evaluated at step {saved['checkpoint_step']}, "
                                             f"these weights are step {loaded.step}; pass --step="
                                             f"{saved['checkpoint_step']} or --restart")
        loaded_step = loaded.step
        source_desc = loaded.source
        echo(f"weights: {loaded.source}")
        try:
            gen = Sampler(loaded.config, loaded.variables, mesh=mesh, mode=run_mode,
                          tokenizer_dir=loaded.tokenizer_dir)
        except ValueError as e:
            raise I.InputError("mode", mode, str(e)) from None
        if gen.mode == "t2v" and not s.first_frame_replacement:
            log.warning("a text-to-video model without first_frame_replacement ignores the first frames")
        import jax

        bs = batch_size or (mesh.size if mesh is not None else jax.local_device_count())
        it = dp.make_eval_iterator(data_cfg, batch_size=bs, split=split, num_examples=num_samples - done,
                                   with_captions=True, with_metadata=False, source=_Offset(source, done))
        write_json(state_json, {"settings": settings, "weights": source_desc, "checkpoint_step": loaded_step},
                   sort_keys=True)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=num_samples, initial=done, unit="clip", desc="evaluate")
        try:
            for batch in it:
                keep = np.asarray(batch["mask"], bool)
                if not keep.any():
                    continue
                captions = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in np.asarray(batch["caption"])]
                # The whole batch is generated (padding rows too: one compiled shape), the real rows are kept.
                fake = gen.generate(np.asarray(batch["image"]), captions,
                                    seed=[int(s.seed) + done + j for j in range(len(keep))],
                                    num_frames=frames, height=height, width=width, progress=False)[keep]
                n = int(keep.sum())
                suite.update(np.asarray(batch["video"])[keep], fake, [c for c, k in zip(captions, keep) if k],
                             first_frames=np.asarray(batch["image"])[keep])
                done += n
                suite.save(state_npz)
                if bar is not None:
                    bar.update(n)
                if on_batch is not None:
                    on_batch(done)
        finally:
            if bar is not None:
                bar.close()
        if done != num_samples:
            raise RuntimeError(f"evaluated {done} clips, expected {num_samples}")

    # ---- result
    res = suite.result()
    protocol = {
        "num_samples": num_samples, "frames": frames, "resolution": [height, width],
        "stride": settings["stride"], "sampler": s.sampler, "steps": int(s.steps), "eta": float(s.eta),
        "image_guidance": float(s.image_guidance), "text_guidance": float(s.text_guidance),
        "seed": int(s.seed), "seeds": "seed + clip index", "first_frame_replacement": bool(s.first_frame_replacement),
        "negative_prompt": s.negative_prompt, "dataset": dataset, "data_dataset": data_cfg.dataset,
        "config_name": settings["config_name"], "split": split, "data_dir": settings["data_dir"],
        "checkpoint_step": loaded_step if loaded_step is not None else step, "ema": bool(use_ema),
        "weights": source_desc, **res["protocol"],
    }  # fmt: skip
    out = {"metrics": res["metrics"], "skipped": res["skipped"], "protocol": protocol, "notes": res["notes"]}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_json(output, out, sort_keys=True)
    line = ", ".join(f"{k}={v:.4g}" for k, v in res["metrics"].items())
    echo(f"wrote {output}: {line or 'no metrics'}")
    for k, why in res["skipped"].items():
        echo(f"skipped {k}: {why}")
    return out
