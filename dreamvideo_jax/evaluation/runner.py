"""What ``python -m dreamvideo_jax.evaluate`` does, as a library function (:func:`evaluate`) that tests call directly.

For each of the first ``num_samples`` clips of an evaluation split (a deterministic pass, clips start at frame 0)
we generate a video from the clip's first frame and caption, and stream (real clip, generated clip, caption) into
a :class:`~dreamvideo_jax.evaluation.suite.MetricSuite`. Every metric whose reference network is available is
computed; the others are listed under ``skipped`` with the reason. A network the user names
(``c3d_weights=``, ``clip_model=``) must exist and load, else an InputError names the flag.

Real clips shorter than the frames asked are padded with their last frame (and read with a smaller stride when
too short for the stride asked): the protocol counts them (``real_clips_padded``, ``real_frames_padded_max``,
``real_clips_stride_reduced``) and ``notes`` carries a WARNING, since FVD against padded clips is biased.

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
with other settings, or an unreadable one, is refused (``restart=True`` discards it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Callable

import ml_collections
import numpy as np

from dreamvideo_jax.checkpoints.lock import Lock
from dreamvideo_jax.sampling import inputs
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


@dataclasses.dataclass
class Options:
    """What to evaluate and where to write it (the evaluate command's flags). Every sampling knob is in the
    config's `sample` section; `overrides` holds the `--config.*` values of the command line
    (e.g. `{'sample.steps': 20}`)."""

    dataset: str = ""
    num_samples: int = 0
    output: str = ""
    workdir: str | None = None
    checkpoint: str | None = None
    step: int | None = None
    ema: bool = True
    random_init: bool = False
    mode: str = "auto"
    data_dir: str | None = None
    config_name: str | None = None
    split: str | None = None
    batch_size: int = 0  # clips generated per batch (0 = the number of devices)
    c3d_weights: str | None = None
    clip_model: str | None = None
    fvd: bool = True
    shapes: bool | None = None  # None: on for dataset='moving_shapes'
    metric_batch_size: int = 8
    restart: bool = False
    progress: bool = True
    overrides: dict = dataclasses.field(default_factory=dict)


def _check_args(opts: Options) -> None:
    if not opts.output or os.path.splitext(opts.output)[1].lower() != ".json":
        raise inputs.InputError("output", opts.output, "give a .json file for the metrics")
    if opts.dataset not in DATASETS:
        raise inputs.InputError("dataset", opts.dataset, f"use one of {', '.join(DATASETS)}")
    inputs.check_positive_int("num_samples", opts.num_samples, "the number of clips to evaluate")
    if opts.batch_size < 0:
        raise inputs.InputError("batch_size", opts.batch_size, "must be >= 0 (0 = the number of devices)")
    if opts.metric_batch_size <= 0:
        raise inputs.InputError("metric_batch_size", opts.metric_batch_size, "must be > 0")
    # A metric network the user names must be there (metrics not asked for are skipped with a reason instead).
    if opts.c3d_weights is not None and not os.path.isfile(opts.c3d_weights):
        raise inputs.InputError("c3d_weights", opts.c3d_weights, "no such file (C3D-UCF101 weights, .npz or "
                                "safetensors; see dreamvideo_jax.evaluation.c3d); leave the flag out to skip IS")
    if opts.clip_model is not None and not os.path.isfile(os.path.join(opts.clip_model, "config.json")):
        what = "no config.json in this folder" if os.path.isdir(opts.clip_model) else "no such folder"
        raise inputs.InputError("clip_model", opts.clip_model, f"{what} (a transformers CLIPModel folder); leave the "
                                "flag out to skip FFF_CLIP and CLIP-SIM")


def _metric_networks(opts: Options) -> tuple:
    """(C3D classifier, CLIP scorer) from the paths given (None where not given); a file that cannot be used is
    an InputError naming its flag."""
    from dreamvideo_jax.evaluation.c3d import C3DClassifier

    c3d = clip = None
    if opts.c3d_weights is not None:
        try:
            c3d = C3DClassifier.from_file(opts.c3d_weights, batch_size=opts.metric_batch_size)
        except (ValueError, OSError) as e:  # unreadable, pickled, missing or mis-shaped tensors
            raise inputs.InputError("c3d_weights", opts.c3d_weights, _without_path(e, opts.c3d_weights)) from None
    if opts.clip_model is not None:
        from dreamvideo_jax.evaluation.clip import CLIPScorer

        try:
            clip = CLIPScorer.from_pretrained(opts.clip_model, batch_size=4 * opts.metric_batch_size)
        except (ValueError, OSError, KeyError) as e:
            raise inputs.InputError("clip_model", opts.clip_model, _without_path(e, opts.clip_model)) from None
    return c3d, clip


def _without_path(e: BaseException, path: str) -> str:
    """An error's message on one line, without a leading ``path: `` (the InputError names the path already)."""
    msg = " ".join(str(e).split())
    return msg[len(path) + 2 :] if msg.startswith(f"{path}: ") else f"{type(e).__name__}: {msg}"


def _open_data(opts: Options, data_cfg):
    from dreamvideo_jax.data import pipeline as data_pipeline

    try:
        source = data_pipeline.open_source(data_cfg, data_cfg.eval_split)
    except FileNotFoundError as e:
        hint = ""
        if DATASETS[opts.dataset][1] is not None and not opts.config_name:
            name = DATASETS[opts.dataset][1]
            hint = (f" (--dataset={opts.dataset} reads the video_folder build named {name!r}: build it "
                    f"with --config_name={name}, or pass --config_name)")
        raise inputs.InputError("dataset", opts.dataset, str(e) + hint) from None
    except ValueError as e:  # e.g. a split the build does not have
        raise inputs.InputError("split", data_cfg.eval_split, str(e)) from None
    if len(source) < opts.num_samples:
        raise inputs.InputError("num_samples", opts.num_samples, f"the {data_cfg.eval_split!r} split of {opts.dataset} "
                                                            f"has {len(source)} clips")
    return source


def _settings(opts: Options, config, data_cfg, suite, size) -> dict:
    """What the saved state depends on: a resumed run must have the same."""
    from dreamvideo_jax.data import pipeline as data_pipeline

    s = config.sample
    frames, height, width = size
    return {
        "version": STATE_VERSION, "dataset": opts.dataset, "data_dataset": data_cfg.dataset,
        "config_name": os.path.basename(os.path.dirname(data_pipeline.dataset_path(data_cfg))),
        "data_dir": data_pipeline.resolve_data_dir(data_cfg), "split": data_cfg.eval_split,
        "frames": frames, "resolution": [height, width], "stride": int(data_cfg.get("frame_stride", 1)),
        "sampler": s.sampler, "steps": int(s.steps), "eta": float(s.eta), "image_guidance": float(s.image_guidance),
        "text_guidance": float(s.text_guidance), "seed": int(s.seed), "timestep_spacing": s.timestep_spacing,
        "first_frame_replacement": bool(s.first_frame_replacement), "negative_prompt": s.negative_prompt,
        "mode": opts.mode, "workdir": opts.workdir, "checkpoint": opts.checkpoint, "step": opts.step,
        "ema": bool(opts.ema), "random_init": bool(opts.random_init), "metrics": suite.settings,
    }  # fmt: skip


def _resume(opts: Options, suite, settings: dict, echo) -> tuple[int, dict]:
    """(clips already done, the saved state's json) from OUTPUT.state.* (or a fresh start)."""
    state_npz, state_json = state_paths(opts.output)
    if opts.restart:
        for p in (state_npz, state_json):
            if os.path.exists(p):
                os.remove(p)
        return 0, {}
    if not (os.path.exists(state_json) and os.path.exists(state_npz)):
        return 0, {}
    try:
        with open(state_json) as f:
            saved = json.load(f)
        if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
            raise ValueError("not a JSON object with the 'settings' of an evaluation")
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise inputs.InputError("output", opts.output, f"the saved evaluation state {state_json} is unreadable "
                                f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); rerun with --restart "
                                "to discard it and start afresh") from None
    if saved.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                      if settings.get(k) != saved.get("settings", {}).get(k))
        raise inputs.InputError("output", opts.output, f"{state_json} holds an evaluation with other settings (differ: "
                                                  f"{', '.join(diff)}); rerun with those, or --restart to discard it")
    try:
        suite.load(state_npz)
    except Exception as e:  # noqa: BLE001 - truncated (BadZipFile, EOFError), missing keys, wrong contents
        raise inputs.InputError("output", opts.output, f"the saved evaluation state {state_npz} is unreadable "
                                f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); rerun with --restart "
                                "to discard it and start afresh") from None
    done = suite.num
    if done > opts.num_samples:
        raise inputs.InputError("num_samples", opts.num_samples, f"{state_json} already holds {done} clips; ask for at "
                                                            "least that many, or --restart")
    echo(f"resuming after {done} of {opts.num_samples} clips ({state_npz})")
    return done, saved


def _generate_and_score(opts: Options, config, data_cfg, source, suite, settings, size, done, saved, *, mesh,
                        on_batch, echo) -> tuple:
    """Generates the clips not done yet and streams them into `suite`, saving its state after every batch;
    returns (checkpoint step, weights description)."""
    import jax

    from dreamvideo_jax.data import pipeline as data_pipeline
    from dreamvideo_jax.errors import CheckpointError
    from dreamvideo_jax.sampling.pipeline import Sampler
    from dreamvideo_jax.sampling.runner import load_weights

    s = config.sample
    run_mode = None if opts.mode == "auto" else opts.mode
    loaded = load_weights(config, workdir=opts.workdir, checkpoint=opts.checkpoint, step=opts.step, ema=opts.ema,
                          random_init=opts.random_init, mode=run_mode)
    if done and saved.get("checkpoint_step") is not None and loaded.step != saved["checkpoint_step"]:
        raise inputs.InputError("step", opts.step, f"the saved state was evaluated at step {saved['checkpoint_step']}, "
                                              f"these weights are step {loaded.step}; pass --step="
                                              f"{saved['checkpoint_step']} or --restart")
    echo(f"weights: {loaded.source}")
    try:
        gen = Sampler(loaded.config, loaded.params, mesh=mesh, mode=run_mode, tokenizer_dir=loaded.tokenizer_dir)
    except CheckpointError as e:
        raise inputs.InputError("mode", opts.mode, str(e)) from None
    if gen.mode == "t2v" and not s.first_frame_replacement:
        log.warning("a text-to-video model without first_frame_replacement ignores the first frames")
    bs = opts.batch_size or (mesh.size if mesh is not None else jax.local_device_count())
    it = data_pipeline.make_eval_iterator(data_cfg, batch_size=bs, split=data_cfg.eval_split,
                               num_examples=opts.num_samples - done, with_captions=True, with_metadata=False,
                               with_frame_info=True, source=_Offset(source, done))
    state_npz, state_json = state_paths(opts.output)
    write_json(state_json, {"settings": settings, "weights": loaded.source, "checkpoint_step": loaded.step},
               sort_keys=True)
    frames, height, width = size
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=opts.num_samples, initial=done, unit="clip", desc="evaluate")
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
                         first_frames=np.asarray(batch["image"])[keep],
                         real_source_frames=np.asarray(batch["source_frames"])[keep])
            done += n
            suite.save(state_npz)
            if bar is not None:
                bar.update(n)
            if on_batch is not None:
                on_batch(done)
    finally:
        if bar is not None:
            bar.close()
    if done != opts.num_samples:
        raise RuntimeError(f"evaluated {done} clips, expected {opts.num_samples}")
    return loaded.step, loaded.source


def evaluate(opts: Options, config=None, *, mesh=None, on_batch: Callable[[int], None] | None = None,
             echo: Callable[[str], None] = print) -> dict:
    """Generates from the first ``opts.num_samples`` clips of ``opts.dataset`` and writes the metrics to
    ``opts.output`` (.json); returns what is written.

    ``config`` (optional with a workdir or checkpoint, whose stored config is used) supplies the `sample` and
    `data` sections; ``on_batch(clips_done)`` is called after each saved batch.

    Raises:
        InputError: a bad argument, a missing workdir or dataset build, or a saved state of other settings
          (one line naming the flag), before any weights are loaded where possible.
    """
    from dreamvideo_jax.evaluation.i3d import MIN_FRAMES
    from dreamvideo_jax.evaluation.suite import MetricSuite
    from dreamvideo_jax.sampling import runner as sample_runner

    _check_args(opts)
    user_config = config
    config = sample_runner.weights_config(config, workdir=opts.workdir, checkpoint=opts.checkpoint,
                                          random_init=opts.random_init)
    config = sample_runner.with_overrides(config, opts.overrides)
    s = config.sample
    size = (int(s.num_frames or config.get("num_frames", 16)), int(s.height or config.get("height", 256)),
            int(s.width or config.get("width", 256)))
    data_cfg = _data_config(config, user_config, dataset=opts.dataset, data_dir=opts.data_dir,
                            config_name=opts.config_name, split=opts.split, num_frames=size[0], height=size[1],
                            width=size[2])
    shapes = (opts.dataset == "moving_shapes") if opts.shapes is None else bool(opts.shapes)
    source = _open_data(opts, data_cfg)

    short = opts.fvd and size[0] < MIN_FRAMES  # known now: do not load I3D for nothing
    c3d, clip = _metric_networks(opts)
    suite = MetricSuite(i3d=False if short else opts.fvd, c3d_weights=c3d, clip_model=clip, shapes=shapes,
                        batch_size=opts.metric_batch_size)
    if short:
        suite.skipped["fvd"] = f"clips have {size[0]} frames; I3D needs >= {MIN_FRAMES} (16 is standard)"
    settings = _settings(opts, config, data_cfg, suite, size)
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    # One evaluation per state file: a second one on the same --output would interleave its clips.
    with Lock(opts.output + ".state.lock", f"the evaluation state of --output={opts.output}"):
        done, saved = _resume(opts, suite, settings, echo)
        loaded_step, source_desc = saved.get("checkpoint_step"), saved.get("weights")
        if done < opts.num_samples:
            loaded_step, source_desc = _generate_and_score(opts, config, data_cfg, source, suite, settings, size,
                                                           done, saved, mesh=mesh, on_batch=on_batch, echo=echo)

    res = suite.result()
    protocol = {
        "num_samples": opts.num_samples, "frames": size[0], "resolution": [size[1], size[2]],
        "stride": settings["stride"], "sampler": s.sampler, "steps": int(s.steps), "eta": float(s.eta),
        "image_guidance": float(s.image_guidance), "text_guidance": float(s.text_guidance),
        "seed": int(s.seed), "seeds": "seed + clip index", "first_frame_replacement": bool(s.first_frame_replacement),
        "negative_prompt": s.negative_prompt, "dataset": opts.dataset, "data_dataset": data_cfg.dataset,
        "config_name": settings["config_name"], "split": data_cfg.eval_split, "data_dir": settings["data_dir"],
        "checkpoint_step": loaded_step if loaded_step is not None else opts.step, "ema": bool(opts.ema),
        "weights": source_desc, **res["protocol"],
    }  # fmt: skip
    notes = list(res["notes"])
    _note_short_clips(suite, protocol, notes)
    out = {"metrics": res["metrics"], "skipped": res["skipped"], "protocol": protocol, "notes": notes}
    os.makedirs(os.path.dirname(os.path.abspath(opts.output)), exist_ok=True)
    write_json(opts.output, out, sort_keys=True)
    line = ", ".join(f"{k}={v:.4g}" for k, v in res["metrics"].items())
    echo(f"wrote {opts.output}: {line or 'no metrics'}")
    for k, why in res["skipped"].items():
        echo(f"skipped {k}: {why}")
    for note in notes:
        if note.startswith("WARNING"):
            log.warning("%s", note)
            echo(note)
    return out


def _note_short_clips(suite, protocol: dict, notes: list) -> None:
    """Counts the real clips too short for the frame stride asked (read with a smaller one) in the protocol."""
    stride, frames = int(protocol["stride"]), int(protocol["frames"])
    src = np.asarray(suite.real_source_frames, np.int64)
    if stride <= 1 or not len(src):
        return
    reduced = int(((src >= 0) & (src < (frames - 1) * stride + 1)).sum())
    protocol["real_clips_stride_reduced"] = reduced
    if reduced:
        notes.append(f"WARNING: {reduced} of {len(src)} real clips are shorter than {frames} frames at stride "
                     f"{stride} ({(frames - 1) * stride + 1} frames) and were read with a smaller stride: their "
                     "motion is slower than the generated clips'")
