"""Evaluate an image-to-video model: generate from real clips' first frames and captions, then compute the metrics.

  python -m dreamvideo_jax.evaluate --workdir=/runs/dreamvideo --dataset=ucf101 --data_dir=/data \\
      --num_samples=2048 --c3d_weights=/weights/c3d_ucf101.npz --clip_model=/weights/clip-vit-b-32 \\
      --output=ucf101.json
  # the moving-shapes demo (adds direction / identity / colour accuracy):
  python -m dreamvideo_jax.evaluate --workdir=/runs/shapes --dataset=moving_shapes --num_samples=256 \\
      --output=shapes.json
  # smoke test with random weights:
  python -m dreamvideo_jax.evaluate --config=configs/tiny.py --random_init --dataset=moving_shapes \\
      --num_samples=4 --config.sample.steps=2 --output=/tmp/metrics.json

Datasets: ``moving_shapes`` (built on first use), ``video_folder`` (a build of ``dreamvideo_jax.data.build``),
``ucf101`` / ``msrvtt`` (``video_folder`` builds named ``ucf101`` / ``msrvtt``: build them with
``python -m dreamvideo_jax.data.build --dataset=video_folder --config_name=ucf101 --source_dir=... --data_dir=...``;
``--config_name`` picks another name). Data come from ``--data_dir`` (default: the config's ``data.data_dir``).

Metrics: FVD (I3D, clips of >= 9 frames), IS (C3D-UCF101, ``--c3d_weights``, 16-frame clips), FFF_CLIP and
CLIP-SIM (``--clip_model``, a transformers CLIPModel folder), FFF_SSIM (always), and the moving-shapes metrics.
Those whose network is not given are listed under ``skipped`` with the reason (a path given that does not exist
or does not load is an error). OUTPUT also records N, frames,
resolution, frame stride, sampler, steps, guidance, seed, dataset, split and checkpoint step.

Resumable: the state is saved after every batch to OUTPUT.state.npz / OUTPUT.state.json; rerunning the same
command continues where it stopped (a larger --num_samples extends a finished run; --restart starts afresh, also
when the saved state is unreadable). Real clips shorter than the frames asked are padded with their last frame:
the protocol counts them and ``notes`` warns (FVD against padded clips is biased).
Sampling knobs (steps, sampler, guidance, seed, size) are `--config.sample.*` keys (`dreamvideo_jax/sampling/config.py`).
Exit code 0 on success; 2 with a one-line ``error: --flag=value: reason`` on bad input; 1 when the run fails.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from dreamvideo_jax import command
from dreamvideo_jax.sampling import config as sample_config

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file(
    "config", sample_config.__file__, "Config file (configs/*.py): the architecture for --random_init and the "
    "`sample` and `data` sections. Default: the weights' stored config, with --config.sample.* overrides.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir: evaluates its latest checkpoint (or --step).")
flags.DEFINE_string("checkpoint", None, "WORKDIR/checkpoints/<step>, a training workdir, or a base checkpoint "
                    "folder (converted pretrained weights).")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
flags.DEFINE_bool("ema", True, "Use the EMA weights (--noema: the raw trained weights).")
flags.DEFINE_bool("random_init", False, "Random weights (a smoke test; needs --config).")
flags.DEFINE_string("mode", "auto", "auto | dreamvideo | t2v.")
flags.DEFINE_string("dataset", None, "ucf101 | msrvtt | video_folder | moving_shapes.")
flags.DEFINE_string("data_dir", None, "tfds data dir holding the build (default: the config's data.data_dir).")
flags.DEFINE_string("config_name", None, "Build name (default: ucf101 / msrvtt for those datasets, else the "
                    "config's data.config_name or the only build present).")
flags.DEFINE_string("split", None, "Split to evaluate (default: the config's data.eval_split).")
flags.DEFINE_integer("num_samples", None, "Number of clips (the first N of the split).")
flags.DEFINE_string("output", None, "Metrics file (.json).")
flags.DEFINE_integer("batch_size", 0, "Clips generated per batch (0 = the number of devices).")
flags.DEFINE_integer("metric_batch_size", 8, "Batch size of the metric networks.")
flags.DEFINE_string("c3d_weights", None, "C3D-UCF101 weights file for IS (not given: IS skipped; given, it must "
                    "exist and load).")
flags.DEFINE_string("clip_model", None, "transformers CLIPModel folder for FFF_CLIP / CLIP-SIM (not given: "
                    "skipped; given, it must exist and load).")
flags.DEFINE_bool("fvd", True, "Compute FVD when clips are long enough (--nofvd: skip it).")
flags.DEFINE_bool("shapes", None, "Moving-shapes metrics (default: on for --dataset=moving_shapes).")
flags.DEFINE_bool("restart", False, "Discard a saved state of an earlier run instead of resuming it.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")

IO_FLAGS = ("dataset", "num_samples", "output", "workdir", "checkpoint", "step", "ema", "random_init", "mode",
            "data_dir", "config_name", "split", "batch_size", "c3d_weights", "clip_model", "fvd", "shapes",
            "metric_batch_size", "restart", "progress")


def main(argv: list[str]) -> int:
    del argv
    command.require(dataset=FLAGS.dataset, num_samples=FLAGS.num_samples, output=FLAGS.output)
    from dreamvideo_jax.evaluation import runner

    opts = runner.Options(**{name: getattr(FLAGS, name) for name in IO_FLAGS},
                          overrides=command.config_overrides())
    runner.evaluate(opts, FLAGS.config if command.config_file() else None)
    return 0


if __name__ == "__main__":
    command.run(main)
