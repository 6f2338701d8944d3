r"""Train DreamVideo (or its text-to-video base).

  python -m dreamvideo_jax.train --config=configs/tiny.py --workdir=/tmp/dreamvideo_tiny
  python -m dreamvideo_jax.train --config=configs/modelscope_t2v.py --workdir=gs://BUCKET/runs/x \
      --config.init_from=gs://BUCKET/base/modelscope --config.train.batch_size=64 --multihost

Rerunning a command with the same workdir resumes from its latest checkpoint. On a multi-host TPU slice pass
`--multihost` (every worker runs the same command); on CPU/GPU clusters also pass `--coordinator_address`,
`--num_processes` and `--process_id`.

Exit status: 0 on success (including a clean stop on SIGTERM after checkpointing), 1 with a one-line
`error: ...` on stderr otherwise (the traceback goes to the log and to WORKDIR/error.log).
"""

from __future__ import annotations

import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Python config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, config and metrics (local or gs://).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else touches JAX.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multihost, when not auto-detected).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multihost, when not auto-detected).")
flags.DEFINE_integer("process_id", None, "This process's index (multihost, when not auto-detected).")


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _write_error_log(workdir: str | None, text: str) -> str | None:
    """Writes the traceback to WORKDIR/error.<process>.log when possible; returns that path."""
    if not workdir:
        return None
    try:
        from etils import epath

        p = epath.Path(workdir)
        if p.is_dir():
            import jax

            path = p / f"error.{jax.process_index()}.log"
            path.write_text(text)
            return str(path)
    except Exception:  # noqa: BLE001 - best effort only
        pass
    return None


class _QuietLibraries:
    """Drops INFO/DEBUG records of orbax's (very chatty) checkpointing internals; warnings still pass."""

    def filter(self, record) -> bool:
        import logging as std_logging

        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.multihost:
        import jax

        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    try:
        if FLAGS.config is None:
            raise ValueError("--config is required (e.g. --config=configs/tiny.py)")
        if not FLAGS.workdir:
            raise ValueError("--workdir is required")
        from dreamvideo_jax.training.loop import train_and_evaluate

        result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Exception as e:  # noqa: BLE001 - the CLI contract: one line on stderr, non-zero exit
        text = traceback.format_exc()
        logging.debug("training failed:\n%s", text)  # shown with --verbosity=1
        where = _write_error_log(FLAGS.workdir, text)
        print(f"error: {_one_line(e)}" + (f" (traceback in {where})" if where else ""), file=sys.stderr, flush=True)
        sys.exit(1)
    state = "stopped on request" if result.preempted else "done"
    loss = result.last_metrics.get("loss")
    print(f"{state}: step {result.step} (started at {result.start_step} from {result.source}); "
          f"checkpoints in {FLAGS.workdir}/checkpoints" + (f"; loss {loss:.6g}" if loss is not None else ""),
          flush=True)


def _flags_parser(argv):
    """absl's parser, but a bad flag (e.g. an unknown --config.x key) is one `error:` line and exit status 2."""
    try:
        return FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags.Error, or config_flags' errors for unknown --config.x keys
        msg = " ".join(str(e).split())
        if isinstance(e, (AttributeError, KeyError)):
            msg = f"unknown config key {msg} in the --config.* flags"
        elif not isinstance(e, flags.Error):
            msg = f"{type(e).__name__}: {msg} (in the command-line flags)"
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


def run() -> None:
    app.run(main, flags_parser=_flags_parser)


if __name__ == "__main__":
    run()
