"""Sample videos from an image and a prompt.

  python -m dreamvideo_jax.sample --workdir=/runs/dreamvideo --image=cat.png --prompt="a cat turns its head" \\
      --output=cat.mp4
  # two stages (the second starts from the first's last frame), DPM-Solver++ in 25 steps, at 512x512:
  python -m dreamvideo_jax.sample --workdir=/runs/dreamvideo --image=cat.png --prompt="a cat sits" \\
      --prompt2="the cat jumps" --sampler=dpmpp_2m --steps=25 --height=512 --width=512 --output=cat.gif
  # a batch from a prompts file (one prompt or JSON object per line), sharded over the devices:
  python -m dreamvideo_jax.sample --workdir=/runs/dreamvideo --image=cat.png --prompts_file=prompts.txt \\
      --output=out/cat.mp4
  # the text-to-video base (converted ModelScope weights), image-to-video by first-frame replacement:
  python -m dreamvideo_jax.sample --checkpoint=/weights/modelscope --image=cat.png --prompt="a cat" \\
      --first_frame_replacement --output=base.mp4
  # smoke test of the whole pipeline with random weights:
  python -m dreamvideo_jax.sample --config=configs/tiny.py --random_init --image=cat.png --output=/tmp/x.mp4

Writes OUTPUT (.mp4 / .gif / .npz with `video` uint8 (F, H, W, 3)), OUTPUT_STEM.png (contact sheet, one row per
stage) and OUTPUT_STEM.json (settings, timings, drift). Unset flags take the config's `sample` defaults
(`dreamvideo_jax/sampling/config.py`). Exit code 0 on success; 2 with a one-line `error: --flag=value: reason`
on bad input.

Compilation is reported apart from sampling. To reuse compiled programs across runs, set JAX's persistent cache,
e.g. `JAX_COMPILATION_CACHE_DIR=~/.cache/jax` (tiny config on CPU: 21 s of compilation becomes 5 s).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py). Optional with --workdir/--checkpoint, whose stored config is used; "
    "its `sample` section (and --config.sample.* overrides) still applies.", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir: samples from its latest checkpoint (or --step).")
flags.DEFINE_string("checkpoint", None, "WORKDIR/checkpoints/<step>, a training workdir, or a base checkpoint "
                    "folder (converted pretrained weights).")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
flags.DEFINE_bool("ema", True, "Use the EMA weights (--noema: the raw trained weights).")
flags.DEFINE_bool("random_init", False, "Random weights (a smoke test of the pipeline; needs --config).")
flags.DEFINE_string("mode", "auto", "auto | dreamvideo | t2v (t2v on DreamVideo weights: the primary U-Net alone).")
flags.DEFINE_string("image", None, "Reference image: any format Pillow reads, any size (resized, centre-cropped).")
flags.DEFINE_string("prompt", "", "Text prompt; empty = text-unconditional.")
flags.DEFINE_string("prompt2", None, "Prompt of a second stage that starts from the first stage's last frame.")
flags.DEFINE_integer("stages", None, "Number of chained stages (default: 1, or 2 with --prompt2); stages beyond "
                     "the given prompts repeat the last prompt.")
flags.DEFINE_string("prompts_file", None, "A batch: one prompt per line, or JSON objects {prompt|prompts, image, "
                    "seed, image_guidance, text_guidance}; outputs are numbered.")
flags.DEFINE_float("image_guidance", None, "Image guidance scale s_I (>= 0).")
flags.DEFINE_float("text_guidance", None, "Text guidance scale s_T (>= 0).")
flags.DEFINE_integer("steps", None, "Denoising steps.")
flags.DEFINE_string("sampler", None, "ddim | dpmpp_2m.")
flags.DEFINE_integer("seed", None, "Seed; sample i of a prompts file uses seed + i.")
flags.DEFINE_float("eta", None, "DDIM noise (0 = deterministic).")
flags.DEFINE_integer("num_frames", None, "Frames per stage.")
flags.DEFINE_integer("height", None, "Height in pixels (a multiple of the autoencoder's factor).")
flags.DEFINE_integer("width", None, "Width in pixels (a multiple of the autoencoder's factor).")
flags.DEFINE_bool("first_frame_replacement", None, "Pin frame 0 to the reference image (image-to-video with a "
                  "text-to-video model).")
flags.DEFINE_string("negative_prompt", None, "Text the guidance pushes away from (replaces the empty prompt of the "
                    "unconditional branches).")
flags.DEFINE_bool("drop_repeated_frame", False, "Leave out each later stage's first frame when joining stages.")
flags.DEFINE_string("output", None, "Output video: .mp4, .gif or .npz.")
flags.DEFINE_string("save_latents", None, "Also write the latents to this .npz as soon as they are sampled.")
flags.DEFINE_float("fps", None, "Frame rate of the written video.")
flags.DEFINE_integer("decode_chunk_size", None, "Frames per sample decoded at once (0 = all; lower = less memory).")
flags.DEFINE_string("loop", None, "python (progress bar) | scan.")
flags.DEFINE_integer("batch_size", 0, "Samples per batch with --prompts_file (0 = the number of devices).")
flags.DEFINE_string("tokenizer", None, "CLIP tokenizer folder (default: the checkpoint's, else CLIP built offline).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")

_OPTION_FLAGS = (
    "output", "image", "prompt", "prompt2", "stages", "prompts_file", "workdir", "checkpoint", "step", "ema",
    "random_init", "mode", "image_guidance", "text_guidance", "steps", "sampler", "seed", "eta", "num_frames",
    "height", "width", "first_frame_replacement", "negative_prompt", "drop_repeated_frame", "save_latents", "fps",
    "decode_chunk_size", "loop", "batch_size", "tokenizer", "progress",
)  # fmt: skip


def _fail(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def _parse(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error (and exit code 2) instead of absl's multi-line report."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(e)
    except Exception as e:  # noqa: BLE001 - a broken --config file: report it in one line
        _fail(f"--config: {type(e).__name__}: {e}")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    from dreamvideo_jax.sampling import cli
    from dreamvideo_jax.sampling.inputs import InputError

    opts = cli.Options(**{name: getattr(FLAGS, name) for name in _OPTION_FLAGS})
    from dreamvideo_jax.training.checkpoint import CheckpointError

    try:
        cli.run(opts, FLAGS.config)
    except InputError as e:
        _fail(e)
    except CheckpointError as e:
        _fail(f"--{'workdir' if FLAGS.workdir else 'checkpoint'}: {e}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
