"""Sample videos from an image and a prompt.

  python -m dreamvideo_jax.sample --workdir=/runs/dreamvideo --image=cat.png --prompt="a cat turns its head" \\
      --output=cat_turns.mp4
  # two stages (the second starts from the first's last frame), DPM-Solver++ in 25 steps, at 512x512:
  python -m dreamvideo_jax.sample --workdir=/runs/dreamvideo --image=cat.png --prompt="a cat sits" \\
      --prompt2="the cat jumps" --config.sample.sampler=dpmpp_2m --config.sample.steps=25 \\
      --config.sample.height=512 --config.sample.width=512 --output=cat.gif
  # a batch from a prompts file (one prompt or JSON object per line), sharded over the devices:
  python -m dreamvideo_jax.sample --workdir=/runs/dreamvideo --image=cat.png --prompts_file=prompts.txt \\
      --output=out/cat.mp4
  # the text-to-video base (converted ModelScope weights), image-to-video by first-frame replacement:
  python -m dreamvideo_jax.sample --checkpoint=/weights/modelscope --image=cat.png --prompt="a cat" \\
      --config.sample.first_frame_replacement=True --output=base.mp4
  # with a LoRA adapter a training run wrote (PATH[:scale], repeatable to stack adapters):
  python -m dreamvideo_jax.sample --workdir=/runs/dreamvideo --lora=/runs/my_clips/adapter:0.8 --image=cat.png \\
      --prompt="a cat moves in a circle" --output=circle.mp4
  # smoke test of the whole pipeline with random weights:
  python -m dreamvideo_jax.sample --config=configs/tiny.py --random_init --image=cat.png --output=/tmp/x.mp4

The flags here say what to read and write. Every sampling knob (guidance, steps, sampler, seed, size, ...) is a
key of the `sample` config section, set with `--config.sample.<key>=<value>` and documented in
`dreamvideo_jax/sampling/config.py`; without `--config` the weights' stored config supplies the rest.

Writes OUTPUT (.mp4 / .gif / .npz with `video` uint8 (F, H, W, 3)), OUTPUT_STEM.png (contact sheet, one row per
stage) and OUTPUT_STEM.json (settings, timings, drift). Exit status 0 on success; 2 with a one-line
`error: --flag=value: reason` on bad input; 1 with a one-line error when the run fails.

Compilation is reported apart from sampling. To reuse compiled programs across runs, set JAX's persistent cache,
e.g. `JAX_COMPILATION_CACHE_DIR=~/.cache/jax` (tiny config on CPU: 21 s of compilation becomes 5 s).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from dreamvideo_jax import command
from dreamvideo_jax.sampling import config as sample_config

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    "config", sample_config.__file__, "Config file (configs/*.py): the architecture for --random_init, the rest of "
    "a base checkpoint's config, and the `sample` section. Default: the weights' stored config, with "
    "--config.sample.* overrides.", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir: samples from its latest checkpoint (or --step).")
flags.DEFINE_string("checkpoint", None, "WORKDIR/checkpoints/<step>, a training workdir, or a base checkpoint "
                    "folder (converted pretrained weights).")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
flags.DEFINE_bool("ema", True, "Use the EMA weights (--noema: the raw trained weights).")
flags.DEFINE_bool("random_init", False, "Random weights (a smoke test of the pipeline; needs --config).")
flags.DEFINE_string("mode", "auto", "auto | dreamvideo | t2v (t2v on DreamVideo weights: the primary U-Net alone).")
flags.DEFINE_string("image", None, "Reference image: any format Pillow reads, any size (resized, centre-cropped).")
flags.DEFINE_string("last_image", None, "The video's last frame (first+last-frame video): an image file of the "
                    "reference image's size. Needs a model trained with model.retention.last_frame, or "
                    "--config.sample.first_frame_replacement=true (pins both frames). A loop: "
                    "--config.sample.seamless_loop=true.")
flags.DEFINE_string("prompt", "", "Text prompt; empty = text-unconditional.")
flags.DEFINE_string("prompt2", None, "Prompt of a second stage that starts from the first stage's last frame.")
flags.DEFINE_string("prompts_file", None, "A batch: one prompt per line, or JSON objects {prompt|prompts, image, "
                    "last_image, seed, image_guidance, text_guidance}; outputs are numbered.")
flags.DEFINE_string("output", None, "Output video: .mp4, .gif or .npz.")
flags.DEFINE_string("save_latents", None, "Also write the latents to this .npz as soon as they are sampled.")
flags.DEFINE_integer("batch_size", 0, "Samples per batch with --prompts_file (0 = the number of devices).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_multi_string("lora", [], "LoRA adapter folder (e.g. WORKDIR/adapter) as PATH or PATH:scale; repeat to "
                          "stack adapters.")
flags.DEFINE_bool("lora_merge", True, "Merge the adapters into the weights at load (--nolora_merge: add them "
                  "inside every denoising step, leaving the weights untouched).")

IO_FLAGS = ("workdir", "checkpoint", "step", "ema", "random_init", "mode", "image", "last_image", "prompt", "prompt2",
            "prompts_file", "output", "save_latents", "batch_size", "progress", "lora", "lora_merge")


def main(argv: list[str]) -> int:
    del argv
    from dreamvideo_jax.sampling import runner

    opts = runner.Options(**{name: getattr(FLAGS, name) for name in IO_FLAGS},
                          overrides=command.config_overrides())
    config = FLAGS.config if command.config_file() else None
    runner.run(opts, config)
    return 0


if __name__ == "__main__":
    command.run(main)
