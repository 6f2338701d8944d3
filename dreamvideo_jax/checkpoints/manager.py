"""Training checkpoints: an orbax CheckpointManager over WORKDIR/checkpoints with the trainer's items.

  WORKDIR/checkpoints/<step>/   one step, with items
      params/      trainable parameters (the system's layout restricted to them, e.g. unet/.../kernel)
      ema/         EMA of the trainable parameters (same tree)
      opt_state/   optax state as a nested dict (`flax.serialization.to_state_dict`)
      meta/        {'step': int32, 'rng': uint32 key data}
      data/        data-iterator state, one `process_<i>-of-<n>.json` per process
      config/      the config at save time (JSON)

A save is written to `<step>.orbax-checkpoint-tmp*` and renamed to `<step>` once complete, so a failed save
never leaves a `<step>` folder behind. A disk that fills up while a checkpoint is written (in the background,
with async checkpointing) is a CheckpointError of one line naming the step, the directory, the complete
checkpoints left and what to do; the failed step's temporary folder is removed (nothing else is touched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

from dreamvideo_jax import config_io
from dreamvideo_jax.checkpoints.base import is_primary, sync_processes
from dreamvideo_jax.errors import CheckpointError, disk_full, one_line
from dreamvideo_jax.parallel import sharding

log = logging.getLogger(__name__)


class DataStateHandler(ocp.CheckpointHandler):
    """Stores each process's data-iterator state as `process_<i>-of-<n>.json` (grain's convention)."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        i, n = jax.process_index(), jax.process_count()
        state = args.state
        if isinstance(state, bytes):
            payload = {"format": "bytes", "state": state.decode("utf-8")}
        else:
            payload = {"format": "json", "state": state}
        (epath.Path(directory) / f"process_{i}-of-{n}.json").write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        i, n = jax.process_index(), jax.process_count()
        path = epath.Path(directory) / f"process_{i}-of-{n}.json"
        if not path.exists():
            found = sorted(p.name for p in epath.Path(directory).iterdir()) if epath.Path(directory).exists() else []
            return {"missing": True, "found": found}
        payload = json.loads(path.read_text())
        state = payload["state"]
        if payload.get("format") == "bytes":
            state = state.encode("utf-8")
        return {"missing": False, "state": state}

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints


def _meta_tree(state) -> dict:
    return {"step": state.step, "rng": state.rng}


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # TrainState
    data_state: Any  # iterator state, or None when this checkpoint has none for this process
    config: dict | None
    path: str


class Checkpointer:
    """orbax CheckpointManager over WORKDIR/checkpoints with this trainer's items.

    Saving decisions (interval, final step, preemption) belong to the loop; every save here is forced.
    """

    def __init__(self, directory: str | epath.Path, *, keep: int = 3, keep_every: int = 0, use_async: bool = True,
                 read_only: bool = False):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep) if keep else None,
            keep_period=int(keep_every) or None,
            enable_async_checkpointing=bool(use_async),
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step of a save still being written in the background
        self._failed = False  # a save failed: close() only releases what it can

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_path(self, step: int) -> str:
        return os.fspath(self.directory / str(step))

    def save(self, state, data_state: Any, config: Any) -> None:
        """Starts saving `state` at its step (async); returns once device buffers are copied out."""
        step = int(sharding.to_host(state.step))
        items = dict(
            params=ocp.args.StandardSave(state.params),
            ema=ocp.args.StandardSave(state.ema),
            opt_state=ocp.args.StandardSave(serialization.to_state_dict(state.opt_state)),
            meta=ocp.args.StandardSave(_meta_tree(state)),
            config=ocp.args.JsonSave(json.loads(config_io.to_json(config))),
        )
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        self.wait()  # a failure of the previous save names that save's step
        with self._writing(step):
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._pending = step

    def wait(self) -> None:
        """Returns once the save in flight (if any) is complete; raises CheckpointError if the disk filled up."""
        step, self._pending = self._pending, None
        with self._writing(step):
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self._failed:  # the error is on its way up; release what can be released without raising another
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001
                log.debug("closing the checkpoint manager after a failed save", exc_info=True)
            return
        self.wait()
        self.manager.close()

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """Turns a full disk while writing checkpoint `step` into a one-line CheckpointError."""
        try:
            yield
        except Exception as e:
            reason = disk_full(e)
            if reason is None or step is None:
                raise
            self._failed = True
            log.debug("writing checkpoint %d failed", step, exc_info=True)
            raise self._disk_full_error(step, reason) from e

    def _disk_full_error(self, step: int, reason: str) -> CheckpointError:
        # The writes orbax abandoned leave coroutines that never ran; Python would warn about each at exit.
        warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)
        removed = self._remove_partial(step)
        try:
            self.manager.reload()
            complete = [s for s in self.all_steps() if s != step]
        except Exception:  # noqa: BLE001 - the listing only informs the message
            complete = None
        where = f"{reason} while writing checkpoint {step} to {os.fspath(self.directory)}"
        if removed:
            where += f" (its partial copy {removed} was removed)"
        if complete:
            left = (f"checkpoint{'s' if len(complete) > 1 else ''} {', '.join(map(str, complete))} "
                    f"{'are' if len(complete) > 1 else 'is'} complete and untouched. Free space there and rerun the "
                    f"same command: training resumes from checkpoint {complete[-1]}, the last complete one")
        elif complete == []:
            left = ("no earlier checkpoint is there. Free space there and rerun the same command: training starts "
                    "again as this run did")
        else:
            left = "Free space there and rerun the same command: training resumes from the last complete checkpoint"
        return CheckpointError(f"{where}; {left}")

    def _remove_partial(self, step: int) -> str:
        """Removes the temporary folder(s) `<step>.orbax-checkpoint-tmp*` of the failed save, and nothing else,
        once orbax's writer threads are done with them; returns what was removed."""
        if not is_primary():
            return ""
        deadline = time.monotonic() + 60.0
        for t in threading.enumerate():  # writers of the failed save that were still going
            if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
                # Thread.join itself: orbax's threads re-raise their error from join()
                threading.Thread.join(t, timeout=max(0.0, deadline - time.monotonic()))
        pattern = re.compile(rf"{step}\.orbax-checkpoint-tmp(-\d+)?")
        removed = []
        try:
            for p in self.directory.iterdir():
                if pattern.fullmatch(p.name) and p.is_dir():
                    p.rmtree()
                    removed.append(os.fspath(p))
        except Exception:  # noqa: BLE001 - the next start-up cleans temporary folders up too
            log.warning("could not remove the partial checkpoint %d in %s", step, self.directory, exc_info=True)
        return ", ".join(removed)

    def read_config(self, step: int) -> dict | None:
        p = self.directory / str(step) / "config"
        if not p.exists():
            return None
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001 - the config item is informational
            return None

    def restore(self, step: int, abstract_state, *, with_data: bool = True, items=("params", "ema", "opt_state",
                                                                                       "meta")) -> Restored:
        """Restores `step` onto the shardings of `abstract_state` (a TrainState of ShapeDtypeStructs)."""
        args = {}
        if "params" in items:
            args["params"] = ocp.args.StandardRestore(abstract_state.params)
        if "ema" in items:
            args["ema"] = ocp.args.StandardRestore(abstract_state.ema)
        if "opt_state" in items:
            args["opt_state"] = ocp.args.StandardRestore(serialization.to_state_dict(abstract_state.opt_state))
        if "meta" in items:
            args["meta"] = ocp.args.StandardRestore(_meta_tree(abstract_state))
        has_data = (self.directory / str(step) / "data").exists()
        if with_data and has_data:
            args["data"] = DataStateRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        state = abstract_state
        if "opt_state" in items:
            state = state.replace(opt_state=serialization.from_state_dict(abstract_state.opt_state, out["opt_state"]))
        for k in ("params", "ema"):
            if k in items:
                state = state.replace(**{k: out[k]})
        if "meta" in items:
            state = state.replace(step=out["meta"]["step"], rng=out["meta"]["rng"])
            if int(sharding.to_host(state.step)) != step:
                raise CheckpointError(f"checkpoint {self.step_path(step)} holds step {int(state.step)}")
        data_state = None
        if with_data and has_data:
            d = out["data"]
            if d.get("missing"):
                log.warning("checkpoint %s has no data-iterator state for process %d of %d (found %s): the data "
                            "order restarts", self.step_path(step), jax.process_index(), jax.process_count(),
                            d.get("found"))
            else:
                data_state = d["state"]
        return Restored(step=step, state=state, data_state=data_state, config=None, path=self.step_path(step))

    def restore_latest(self, abstract_state, *, on_corrupt: str = "error", with_data: bool = True) -> Restored | None:
        """The newest restorable checkpoint, or None when there is none.

        An unreadable checkpoint raises CheckpointError naming it (`on_corrupt='error'`), or is logged, moved to
        WORKDIR/checkpoints_corrupt/ and the previous one is tried (`on_corrupt='fallback'`).
        """
        for step in reversed(self.all_steps()):
            try:
                return self.restore(step, abstract_state, with_data=with_data)
            except Exception as e:  # noqa: BLE001 - re-raised with the checkpoint's path, never swallowed silently
                path = self.step_path(step)
                if on_corrupt != "fallback":
                    raise CheckpointError(
                        f"checkpoint {path} cannot be restored ({one_line(e)}); delete it to resume from the "
                        f"previous checkpoint, or set --config.train.corrupt_checkpoint=fallback") from e
                log.error("checkpoint %s cannot be restored (%s); moving it aside and falling back to the "
                          "previous checkpoint", path, one_line(e))
                self._move_aside(step)
        return None

    def _move_aside(self, step: int) -> None:
        src = self.directory / str(step)
        dst_root = self.directory.parent / (self.directory.name + "_corrupt")
        if is_primary():
            dst_root.mkdir(parents=True, exist_ok=True)
            dst = dst_root / str(step)
            if dst.exists():
                dst.rmtree()
            src.rename(dst)
        sync_processes(f"move_aside_{step}")
        self.manager.reload()
