r"""Train DreamVideo (or its text-to-video base).

  python -m dreamvideo_jax.train --config=configs/tiny.py --workdir=/tmp/dreamvideo_tiny
  python -m dreamvideo_jax.train --config=configs/modelscope_t2v.py --workdir=gs://BUCKET/runs/x \
      --config.init_from=gs://BUCKET/base/modelscope --config.train.per_device_batch_size=2 --multihost

Rerunning a command with the same workdir resumes from its latest checkpoint. On a multi-host TPU slice pass
`--multihost` (every worker runs the same command); on CPU/GPU clusters also pass `--coordinator_address`,
`--num_processes` and `--process_id`.

Exit status: 0 on success (including a clean stop on SIGTERM after checkpointing); 2 with a one-line `error: ...`
on stderr for a bad flag or config key; 1 with a one-line `error: ...` when the run fails (the traceback goes to
the log and, for unexpected errors, to WORKDIR/error.<process>.log). A disk that fills up while a checkpoint is
written stops the run with the step, the checkpoints left intact and the partial one removed: free space and rerun.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from dreamvideo_jax import command

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, config and metrics (local or gs://).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else touches JAX.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multihost, when not auto-detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multihost, when not auto-detected).")
flags.DEFINE_integer("process_id", None, "This process's index (multihost, when not auto-detected).")


def main(argv) -> int:
    del argv
    if FLAGS.multihost:
        import jax

        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    command.require(config=FLAGS.config, workdir=FLAGS.workdir)
    command.ERROR_LOG_DIR = FLAGS.workdir
    from dreamvideo_jax.training.loop import train_and_evaluate

    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    state = "stopped on request" if result.preempted else "done"
    loss = result.last_metrics.get("loss")
    print(f"{state}: step {result.step} (started at {result.start_step} from {result.source}); "
          f"checkpoints in {FLAGS.workdir}/checkpoints" + (f"; loss {loss:.6g}" if loss is not None else ""),
          flush=True)
    return 0


def run() -> None:
    command.run(main)


if __name__ == "__main__":
    run()
