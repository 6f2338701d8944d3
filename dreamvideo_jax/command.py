"""The command layer every entry point (`python -m dreamvideo_jax.X`) runs through: absl flags, one-line errors.

  def main(argv): ...                     # raises errors.UserError (or its subclasses) for bad input
  if __name__ == "__main__":
      command.run(main)

Errors, in one place:
* a bad flag, an unknown `--config.x` key or a broken config file: `error: ...` on stderr, exit status 2;
* a `UserError` raised by `main` (bad argument, unusable checkpoint, incompatible config): `error: ...`, exit
  status 2 for `InputError` (a bad argument), 1 otherwise;
* a full disk (ENOSPC, or a library's error made of it) that no layer below turned into a `UserError`:
  `error: no space left on device (Type: message); free space and rerun the same command`, exit status 1;
* anything else is a bug: `error: Type: message` plus the traceback in the log (`--verbosity=1` prints it) and,
  when `main` sets `command.ERROR_LOG_DIR`, in `ERROR_LOG_DIR/error.<process>.log`; exit status 1.

Log records of orbax's checkpointing internals below WARNING are dropped, and so are, below `--verbosity=1`,
the tracebacks that its background threads log for a failed write (one per thread, plus asyncio's "Task
exception was never retrieved" for each sibling write at exit): the failure itself comes back to the main
thread, which reports it as above.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from dreamvideo_jax.errors import InputError, UserError, disk_full, one_line

FLAGS = flags.FLAGS
ERROR_LOG_DIR: str | None = None  # set by a main that owns a folder (training: its workdir)


def fail(message: Any, code: int = 2) -> None:
    """Prints `error: <message>` as one line on stderr and exits with `code`."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags.Error, or config_flags' errors for unknown --config.x keys
        msg = " ".join(str(e).split())
        if isinstance(e, (AttributeError, KeyError)):
            msg = f"unknown config key {msg} in the --config.* flags"
        elif not isinstance(e, flags.Error):
            msg = f"--config: {type(e).__name__}: {msg}"
        fail(msg)
    if len(rest) > 1:
        fail(f"unexpected arguments {rest[1:]} (flags are --name=value)")
    return rest


def _write_error_log(text: str) -> str | None:
    if not ERROR_LOG_DIR:
        return None
    try:
        import jax
        from etils import epath

        p = epath.Path(ERROR_LOG_DIR)
        if p.is_dir():
            path = p / f"error.{jax.process_index()}.log"
            path.write_text(text)
            return str(path)
    except Exception:  # noqa: BLE001 - best effort only
        pass
    return None


class _QuietLibraries:
    """Drops INFO/DEBUG records of orbax's (very chatty) checkpointing internals (warnings still pass), and the
    tracebacks of failures inside orbax that its threads (or asyncio, for its tasks) log, unless --verbosity >= 1:
    the main thread gets the same failure back and reports it on one line."""

    def filter(self, record) -> bool:
        import logging as std_logging

        if "/orbax/" in record.pathname and record.levelno < std_logging.WARNING:
            return False
        if record.exc_info and record.exc_info[2] is not None and logging.get_verbosity() < 1:
            return not any("/orbax/" in frame.filename for frame in traceback.extract_tb(record.exc_info[2]))
        return True


def run(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)` with this module's error contract (see the module docstring)."""

    def wrapped(argv):
        logging.get_absl_handler().addFilter(_QuietLibraries())
        try:
            code = main(argv)
        except InputError as e:
            fail(e, 2)
        except UserError as e:
            fail(e, 1)
        except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in the log
            reason = disk_full(e)
            if reason is not None:  # not a bug, and no room for an error log either
                logging.debug("failed:\n%s", traceback.format_exc())
                fail(f"{reason} ({one_line(e, 600)}); free space and rerun the same command", 1)
            text = traceback.format_exc()
            logging.debug("failed:\n%s", text)  # shown with --verbosity=1
            where = _write_error_log(text)
            fail(one_line(e, 2000) + (f" (traceback in {where})" if where else ""), 1)
        sys.exit(code or 0)

    app.run(wrapped, flags_parser=_parse_flags)


def require(**values: Any) -> None:
    """Raises InputError for the first flag given as None or ''."""
    for name, value in values.items():
        if value is None or value == "":
            raise InputError(name, value, "is required")


def config_overrides(flag_name: str = "config") -> dict[str, Any]:
    """`{'sample.steps': 20, ...}`: the `--<flag_name>.*` values given on the command line."""
    return dict(config_flags.get_override_values(FLAGS[flag_name]))


def config_file(flag_name: str = "config") -> str | None:
    """The path given as `--<flag_name>` (None when the flag kept its default)."""
    flag = FLAGS[flag_name]
    return config_flags.get_config_filename(flag) if flag.present else None
