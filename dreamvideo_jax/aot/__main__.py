"""Will it fit? Compile the real train step or sampling programs for a Cloud TPU slice, here, without a TPU.

  python -m dreamvideo_jax.aot --config=configs/modelscope_t2v.py --topology=v5e-16 --program=train
  python -m dreamvideo_jax.aot --config=configs/modelscope_t2v.py --topology=v5e:2x2 --devices=1 \\
      --program=sample --height=512 --width=512 --config.model.dtype=bfloat16 --output=sample_v5e.json

libtpu (`pip install -e ".[tpu]"`, also in the test extras) describes the slice's devices and XLA:TPU compiles
for them: per chip, the program's arguments, outputs, temporaries and their peak against the chip's HBM, FLOPs
and bytes accessed, a roofline step time (the larger of FLOPs / peak bf16 FLOP/s and bytes / HBM bandwidth) and the
MFU bound it implies, and the lower and compile seconds. `--topology` is a topology (`v5e:4x4`, `v4:2x2x4`) or
an accelerator type as gcloud names it (`v5litepod-16`, `v6e-8`, `v4-32`, `v5p-8`); `--devices=N` compiles for
the first N chips only. Any `--config.*` key overrides the config, as in training.

`--program=train`: the `Trainer`'s step for the global batch the config gives on that slice (set
`--config.train.per_device_batch_size`). `--program=sample`: the text encoder, `prepare`, one guided denoising
step (all guidance branches in one batch) and the VAE decode of one request, one sample per chip by default
(`--batch`), at the config's clip size or `--frames/--height/--width`.

Prints a table, writes the JSON report to `--output` when given. Exit status 0 when the peak fits the chip's HBM
less `--headroom`; 1 when it does not (the table then names the largest buffers and what to change); 2 with a
one-line error for a bad flag, an unknown topology or a missing libtpu.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from dreamvideo_jax import command
from dreamvideo_jax.aot import programs as programs_lib
from dreamvideo_jax.errors import InputError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("topology", None, "TPU slice: a topology (v5e:4x4, v4:2x2x4) or accelerator type (v5litepod-16, "
                    "v6e-8, v4-32, v5p-8).")
flags.DEFINE_enum("program", "train", programs_lib.PROGRAMS, "What to compile: the train step or the sampling programs.")
flags.DEFINE_integer("devices", 0, "Compile for the first N chips of the topology (0 = all).")
flags.DEFINE_integer("batch", 0, "sample: samples per request (0 = one per chip).")
flags.DEFINE_integer("frames", 0, "sample: frames per clip (0 = the config's).")
flags.DEFINE_integer("height", 0, "sample: height in pixels (0 = the config's).")
flags.DEFINE_integer("width", 0, "sample: width in pixels (0 = the config's).")
flags.DEFINE_float("headroom", programs_lib.DEFAULT_HEADROOM, "Share of HBM to keep free when judging the fit.")
flags.DEFINE_string("output", None, "Write the JSON report here.")
flags.DEFINE_bool("search", False, "train: compile remat x clips per chip x mesh splits and report the fitting "
                  "setting with the best roofline throughput, as --config flags (one compile each: slow at full size).")


def main(argv) -> int:
    del argv
    command.require(config=FLAGS.config, topology=FLAGS.topology)
    if not 0.0 <= FLAGS.headroom < 1.0:
        raise InputError("headroom", FLAGS.headroom, "must be in [0, 1)")
    for name in ("devices", "batch", "frames", "height", "width"):
        if getattr(FLAGS, name) < 0:
            raise InputError(name, getattr(FLAGS, name), "must be >= 0")
    from dreamvideo_jax.aot import chips as chips_lib

    slice_ = chips_lib.parse(FLAGS.topology)
    programs_lib.tpu_environment()
    devices = programs_lib.topology_devices(slice_, FLAGS.devices)
    config = FLAGS.config
    if FLAGS.search:
        if FLAGS.program != "train":
            raise InputError("search", True, "searches the train step's settings: use it with --program=train")
        found = programs_lib.search(config, slice_, devices, FLAGS.headroom)
        if FLAGS.output:
            with open(FLAGS.output, "w") as f:
                json.dump(found, f, indent=1)
        best = found["best"]
        if best is None:
            print(f"nothing tried fits {slice_.topology}: a larger slice, bf16 (--config.model.dtype=bfloat16) "
                  "or smaller clips", flush=True)
            return 1
        print(f"best on {slice_.topology}: {best['flags']} (peak {best['peak_gib']:.2f} GiB, roofline "
              f"{1e3 * best['roofline_seconds']:.1f} ms, {best['clips_per_second_per_chip']:.3f} clips/s per chip)",
              flush=True)
        return 0
    if FLAGS.program == "train":
        try:
            reports, facts, _ = programs_lib.compile_train(config, devices)
        except ValueError as e:  # a config that cannot be laid over this slice (batch, mesh)
            raise InputError("config", FLAGS.topology, str(e)) from None
    else:
        reports, facts = programs_lib.compile_sample(
            config, devices, batch=FLAGS.batch or len(devices), num_frames=FLAGS.frames or None,
            height=FLAGS.height or None, width=FLAGS.width or None)
    report = programs_lib.summarize(config, FLAGS.program, slice_, len(devices), reports, facts, FLAGS.headroom)
    print(programs_lib.table(report), flush=True)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(report, f, indent=1)
        print(f"report: {FLAGS.output}", flush=True)
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    programs_lib.tpu_environment()  # before anything initialises JAX's backends
    command.run(main)
