"""`train_and_evaluate(config, workdir)`: the training loop behind `python -m dreamvideo_jax.train`.

Evaluation: with `train.eval_every > 0` the loss on the first `train.eval_batches` batches of `data.eval_split`
(EMA weights, the same noise every time; `Evaluator`) is logged as `eval_loss` every `train.eval_every` steps and
at the last step.

Start-up order: this workdir's latest checkpoint -> `config.resume` (another workdir or one of its
checkpoints) -> `config.init_from` (a base checkpoint of converted weights, or a training workdir) -> random
init. A checkpoint that cannot be read is an error naming it (or, with `train.corrupt_checkpoint='fallback'`,
a logged fall-back to the previous one); it never silently becomes a fresh start.

Saving: every `train.checkpoint_every` steps, at the last step, and when the process is asked to stop (SIGTERM,
or JAX's preemption notice on multi-process runs), after which the loop returns normally.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from dreamvideo_jax import checkpoints, config_io
from dreamvideo_jax import system as system_lib
from dreamvideo_jax.checkpoints.base import sync_processes
from dreamvideo_jax.checkpoints.lock import Lock
from dreamvideo_jax.diffusion import schedules
from dreamvideo_jax.errors import CheckpointError, IncompatibleConfigError, InputError, WorkdirError, one_line
from dreamvideo_jax.parallel.sharding import to_host
from dreamvideo_jax.training import metric_log
from dreamvideo_jax.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    step: int  # steps completed (the state's step)
    start_step: int
    preempted: bool
    source: str  # where the run started from: 'workdir' | 'resume' | 'init_from' | 'scratch'
    last_metrics: dict
    compile_seconds: float | None
    steps_per_second: float | None


# ----------------------------------------------------------------------------------------------------------------
# Preemption


class PreemptionWatcher:
    """True once the process should checkpoint and stop.

    Single process: SIGTERM and SIGINT (Ctrl-C) set a flag, so either stops the run after the current step with
    a checkpoint; a second Ctrl-C aborts at once. Multi-process with JAX's preemption service (started by
    `jax.distributed.initialize`): `reached_preemption_sync_point`, which makes every process agree on the step.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._sync = False
        if jax.process_count() > 1:
            try:
                from jax._src import distributed

                self._sync = distributed.global_state.preemption_sync_manager is not None
            except Exception:  # noqa: BLE001
                self._sync = False
        self._previous_int = None
        if not self._sync and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._previous_int = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self._flag.is_set():
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without the checkpoint
        log.warning("received signal %d: saving a checkpoint and stopping after this step%s", signum,
                    " (Ctrl-C again to abort without it)" if signum == signal.SIGINT else "")
        self._flag.set()

    def reached(self, step: int) -> bool:
        if self._sync:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() > 1:  # no preemption service: agree on the flag explicitly
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.int32(self._flag.is_set()))
            return bool(np.max(flags))
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous_int = None


# ----------------------------------------------------------------------------------------------------------------
# Workdir


def prepare_workdir(workdir: str) -> epath.Path:
    if not workdir:
        raise WorkdirError("no workdir given")
    path = epath.Path(workdir)
    try:
        if jax.process_index() == 0:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write_test_{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
    except Exception as e:  # noqa: BLE001 - turned into one readable error
        raise WorkdirError(f"workdir {workdir} is not writable: {one_line(e)}") from e
    sync_processes("prepare_workdir")
    return path


def _objective(config) -> dict:
    """What a checkpoint's weights mean besides their shapes: the prediction target and the noise schedule."""
    train = config_io.to_dict(config).get("train", {})
    return {"train": {"prediction_type": train.get("prediction_type", "eps")},
            "diffusion": schedules.section(config.get("diffusion"))}


def _check_compatible(stored: Any, config, what: str, objective: bool = True) -> None:
    """Resuming needs the same parameter trees AND the same objective (an eps model continued as v-prediction, or
    on another schedule, would silently learn something else); initialising from other weights (`objective=False`)
    needs the same trees only."""
    stored = ml_collections.ConfigDict(config_io.to_dict(stored))
    diffs = system_lib.architecture_diff(stored.to_dict(), config)
    if objective:
        diffs += config_io.diff(_objective(stored), _objective(config))
    if diffs:
        raise IncompatibleConfigError(
            f"{what} was written with a different architecture or objective; differing keys: " + "; ".join(diffs[:12])
            + (f" (+{len(diffs) - 12} more)" if len(diffs) > 12 else ""))


def _log_config_changes(stored, config) -> None:
    changes = config_io.diff(config_io.to_dict(stored), config_io.to_dict(config))
    if changes:
        log.info("config changes since the last run: %s", "; ".join(changes[:20]))


# ----------------------------------------------------------------------------------------------------------------
# Initial parameters


def _base_target(tr: Trainer, keys=None) -> dict:
    """Abstract (sharded) targets of the layout's non-empty groups, or of `keys` among them."""
    a = tr.abstract_all()
    return {k: v for k, v in a.items() if jax.tree.leaves(v) and (keys is None or k in keys)}


def _params_from_base(tr: Trainer, base: dict, fallback: dict | None = None) -> dict:
    """All params from a base dict; groups the model lacks (e.g. the retention branch when the base came from a
    t2v run) are ignored, groups the base lacks come from `fallback`."""
    out = {}
    for k in tr.system.groups:
        if k in base and (jax.tree.leaves(base[k]) or fallback is None):
            out[k] = base[k]
        else:
            out[k] = fallback[k] if fallback is not None else {}
    return out


def check_source_model(stored: ml_collections.ConfigDict, config, what: str, source_has_branch: bool = True) -> None:
    fake = {"model": stored.to_dict(), "train": config_io.to_dict(config.train)}
    if not source_has_branch and "retention" in config.model:
        # A source without retention parameters (t2v run, converted base): its branch settings cannot conflict.
        fake["model"]["retention"] = config_io.to_dict(config.model.retention)
    _check_compatible(fake, config, what, objective=False)


def load_init_from(tr: Trainer, path: str, key: jax.Array) -> dict:
    """All params for a fresh run from `config.init_from` (base checkpoint or training workdir)."""
    config = tr.config
    try:
        loc = checkpoints.locate(path, "config.init_from")
    except InputError:
        raise CheckpointError(f"init_from {path} is neither a base checkpoint ({checkpoints.base.BASE_MODEL_CONFIG}) "
                              f"nor a training workdir ({checkpoints.CONFIG_FILE} and {checkpoints.BASE_DIR}/)") from None
    params = tr.init_params(key)
    if loc.kind == "workdir":
        root = loc.root
        base_path = os.fspath(epath.Path(root) / checkpoints.BASE_DIR)
        stored = set(checkpoints.base_shapes(base_path))
        check_source_model(checkpoints.read_workdir_config(root).model, config, f"init_from workdir {root}",
                            source_has_branch="retention" in stored)
        want = set(_base_target(tr)) & stored
        base, _ = checkpoints.load_base(base_path, target=_base_target(tr, want))
        try:
            trainable, step = checkpoints.load_trainable(root, loc.step, bool(config.train.init_from_ema))
            flat = system_lib.flatten(base)
            shardings = system_lib.flatten(tr.param_shardings)
            for k, v in system_lib.flatten(trainable).items():
                if k.split(system_lib.SEP)[0] in base and k in shardings:
                    flat[k] = tr.put(v, shardings[k])
            base = {**base, **system_lib.unflatten(flat)}
            log.info("init_from %s: checkpoint step %d (%s) over its base", root, step,
                     "EMA" if config.train.init_from_ema else "params")
        except CheckpointError as e:
            log.warning("init_from %s: %s; using its initial weights (base)", root, e)
    else:
        stored = set(checkpoints.base_shapes(path))
        check_source_model(checkpoints.read_model_config(path), config, f"init_from base {path}",
                            source_has_branch="retention" in stored)
        want = set(_base_target(tr)) & stored
        base, _ = checkpoints.load_base(path, target=_base_target(tr, want))
        log.info("init_from base %s: loaded %s", path, sorted(base))
    src_has_branch = "retention" in base
    if "unet" not in base:
        raise CheckpointError(f"init_from {path} holds no 'unet' parameters")
    params = _params_from_base(tr, base, params)
    if tr.mode == "dreamvideo" and not src_has_branch:
        params = tr.copy_retention_from_unet(params)
        log.info("retention branch initialised from the loaded primary U-Net")
    return params


# ----------------------------------------------------------------------------------------------------------------
# Loop


def _data_iterator(config, state_to_restore):
    from dreamvideo_jax.data import pipeline

    it = pipeline.make_train_iterator(
        config.data,
        batch_size=int(config.train.batch_size),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if state_to_restore is not None:
        it.set_state(state_to_restore)
    return it


class Evaluator:
    """The evaluation of `train.eval_every`: the loss of `make_eval_step` over the first `train.eval_batches`
    batches of `data.eval_split`, with the EMA weights and a fixed key per batch (the same noise every time).
    The split is opened when this is built, so a missing split fails at start-up, not hours into a run."""

    def __init__(self, tr: Trainer, config):
        from dreamvideo_jax.data import pipeline

        self.tr, self.config = tr, config
        self.num_batches = int(config.train.eval_batches)
        self.batch_size = int(config.train.batch_size)
        try:
            self.source = pipeline.open_source(config.data, config.data.get("eval_split", "validation"))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"train.eval_every={config.train.eval_every} needs data.eval_split="
                             f"{config.data.get('eval_split')!r}: {e}") from None
        base = jax.random.fold_in(jax.random.key(int(config.seed)), 0xE7A1)
        self.keys = [jax.random.fold_in(base, i) for i in range(self.num_batches)]

    def __call__(self, state, frozen) -> dict:
        from dreamvideo_jax.data import pipeline

        it = pipeline.make_eval_iterator(
            self.config.data, batch_size=self.batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(), num_examples=self.num_batches * self.batch_size,
            with_captions=False, with_metadata=False, source=self.source)
        total = count = 0.0
        t0 = time.perf_counter()
        try:
            for i, local in zip(range(self.num_batches), it):
                batch = self.tr.global_batch(local)
                mask = self.tr.global_batch({"mask": np.asarray(local["mask"])})["mask"]
                out = to_host(self.tr.eval_step(state.ema, frozen, batch, mask, self.keys[i]))
                total += float(out["loss_sum"])
                count += float(out["count"])
        finally:
            _close(it)
        return {"eval_loss": total / max(count, 1.0), "eval_examples": count,
                "eval_seconds": time.perf_counter() - t0}


def _close(x) -> None:
    close = getattr(x, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # noqa: BLE001
            pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data_iterator=None) -> TrainResult:
    """Trains `config` in `workdir` until `train.num_steps` (or a preemption signal) and returns a summary.

    Args:
      config: the full config (see `configs/`); not modified.
      workdir: local path or gs://; created if missing. Rerunning with the same workdir resumes.
      data_iterator: optional iterator of per-process numpy batches with `get_state()`/`set_state()` (tests,
        custom data); default the grain pipeline of `config.data`.

    Raises:
      WorkdirError, IncompatibleConfigError, CheckpointError, NonFiniteLossError, ValueError (bad config).
    """
    config = ml_collections.ConfigDict(config_io.to_dict(config))
    # Listen for SIGTERM from the start: a notice during start-up stops the run after its first step's checkpoint.
    watcher = PreemptionWatcher()
    try:
        return _train(config, workdir, data_iterator, watcher)
    finally:
        watcher.close()


def _train(config, workdir: str, data_iterator, watcher: PreemptionWatcher) -> TrainResult:
    tr = Trainer(config)  # checks the config before anything is written
    wd = prepare_workdir(workdir)
    lock = Lock(os.fspath(wd / ".lock"), f"workdir {workdir}") if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()  # released in the finally below; another trainer on this workdir fails here
    try:
        return _train_locked(tr, config, wd, workdir, data_iterator, watcher)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(tr: Trainer, config, wd: epath.Path, workdir: str, data_iterator,
                  watcher: PreemptionWatcher) -> TrainResult:
    t = config.train
    stored_config = checkpoints.read_workdir_config(os.fspath(wd))
    if stored_config is not None:
        _check_compatible(stored_config, config, f"workdir {workdir}")
        _log_config_changes(stored_config, config)
    log.info("mesh %s over %d devices (%d processes); %d trainable parameter arrays", dict(tr.mesh.shape),
             tr.mesh.size, jax.process_count(), len(tr.system.trainable_paths))
    ckpt = checkpoints.Checkpointer(checkpoints.checkpoint_dir(os.fspath(wd)), keep=int(t.keep_checkpoints),
                                    keep_every=int(t.keep_every), use_async=bool(t.async_checkpointing))
    data_it = None
    writer = None
    try:
        state, frozen, data_state, source = start_state(tr, config, wd, ckpt)
        checkpoints.write_workdir_config(os.fspath(wd), config)
        start_step = int(to_host(state.step))
        log.info("starting at step %d (%s)", start_step, source)

        data_it = data_iterator if data_iterator is not None else _data_iterator(config, None)
        if data_state is not None:
            data_it.set_state(data_state)
        writer = metric_log.MetricWriter(os.fspath(wd), resume_step=start_step)
        evaluator = Evaluator(tr, config) if int(t.get("eval_every", 0)) > 0 else None
        result = run_steps(tr, config, state, frozen, data_it, ckpt, writer, watcher, start_step, evaluator)
        result.source = source
        return result
    finally:
        if writer is not None:
            writer.close()
        if data_iterator is None and data_it is not None:
            _close(data_it)
        ckpt.close()


def start_state(tr: Trainer, config, wd: epath.Path, ckpt: checkpoints.Checkpointer):
    """(state, frozen, data_state, source) following the resume order."""
    t = config.train
    base_dir = wd / checkpoints.BASE_DIR
    key = jax.random.key(int(config.seed))
    # 1. This workdir.
    if ckpt.all_steps():
        if not checkpoints.is_base(os.fspath(base_dir)):
            raise CheckpointError(f"workdir {wd} has checkpoints but no {base_dir} (frozen weights)")
        base, _ = checkpoints.load_base(os.fspath(base_dir), target=_base_target(tr))
        restored = ckpt.restore_latest(tr.abstract_state, on_corrupt=t.corrupt_checkpoint)
        if restored is not None:
            params = _params_from_base(tr, base)
            _, frozen = tr.split(params)
            log.info("resuming from %s", restored.path)
            return restored.state, frozen, restored.data_state, "workdir"
        log.error("no restorable checkpoint left in %s; continuing with the next start option", ckpt.directory)
    # 2. config.resume.
    if config.get("resume"):
        try:
            loc = checkpoints.locate(config.resume, "config.resume")
        except InputError as e:
            raise CheckpointError(f"resume {config.resume}: not a training workdir ({e})") from None
        if loc.kind != "workdir":
            raise CheckpointError(f"resume {config.resume}: a base checkpoint, not a training workdir (use "
                                  "config.init_from for a base)")
        src, step = loc.root, loc.step
        _check_compatible(checkpoints.read_workdir_config(src), config, f"resume workdir {src}")
        base, _ = checkpoints.load_base(os.fspath(epath.Path(src) / checkpoints.BASE_DIR), target=_base_target(tr))
        src_ckpt = checkpoints.Checkpointer(checkpoints.checkpoint_dir(src), read_only=True, use_async=False)
        try:
            if step is None:
                restored = src_ckpt.restore_latest(tr.abstract_state, on_corrupt=t.corrupt_checkpoint)
                if restored is None:
                    raise CheckpointError(f"resume {config.resume}: no checkpoint in {src_ckpt.directory}")
            else:
                try:
                    restored = src_ckpt.restore(step, tr.abstract_state)
                except Exception as e:  # noqa: BLE001
                    raise CheckpointError(f"resume checkpoint {config.resume} cannot be restored: "
                                          f"{one_line(e)}") from e
        finally:
            src_ckpt.close()
        params = _params_from_base(tr, base)
        _write_base(tr, base_dir, params, config)
        _, frozen = tr.split(params)
        log.info("resuming from %s", restored.path)
        return restored.state, frozen, restored.data_state, "resume"
    # 3./4. init_from or scratch.
    if config.get("init_from"):
        params = load_init_from(tr, config.init_from, key)
        source = "init_from"
    else:
        params = tr.init_params(key)
        source = "scratch"
    _write_base(tr, base_dir, params, config)
    trainable, frozen = tr.split(params)
    state = tr.init_state(trainable)
    return state, frozen, None, source


def _write_base(tr: Trainer, base_dir: epath.Path, params: dict, config) -> None:
    tree = {k: v for k, v in params.items() if jax.tree.leaves(v)}
    if checkpoints.is_base(os.fspath(base_dir)) and (base_dir / checkpoints.base.BASE_PARAMS).exists():
        have = checkpoints.base_shapes(os.fspath(base_dir))
        want = jax.tree.map(lambda a: tuple(a.shape), tree)
        diffs = system_lib.shape_diffs(have, want)
        if not diffs:
            log.info("base weights already in %s", base_dir)
            return
        raise CheckpointError(f"{base_dir} holds weights of another model ({'; '.join(diffs[:5])}); "
                              f"use a new workdir")
    if (base_dir / checkpoints.base.BASE_PARAMS).exists() and jax.process_index() == 0:
        (base_dir / checkpoints.base.BASE_PARAMS).rmtree()  # an interrupted earlier write (no model_config.json)
    sync_processes("base_cleanup")
    checkpoints.save_base(os.fspath(base_dir), tree, config.model)
    log.info("wrote base weights to %s", base_dir)


def run_steps(tr: Trainer, config, state, frozen, data_it, ckpt: checkpoints.Checkpointer,
         writer: metric_log.MetricWriter,
         watcher: PreemptionWatcher, start_step: int, evaluator: Evaluator | None = None) -> TrainResult:
    t = config.train
    eval_every = int(t.get("eval_every", 0))
    num_steps, every, log_every = int(t.num_steps), int(t.checkpoint_every), max(1, int(t.log_every))
    batch_size = int(t.batch_size)
    acc = metric_log.Accumulator(int(t.timestep_buckets), tr.system.schedule.num_train_timesteps)
    progress = metric_log.Progress(bool(t.progress_bar), num_steps, start_step)
    step = start_step
    pending: tuple[int, Any] | None = None
    last_metrics: dict = {}
    preempted = False
    t_log, data_seconds = time.perf_counter(), 0.0
    run_t0, run_steps = None, 0

    def check(item) -> None:
        s, m = item
        m = to_host(m)
        if not bool(m["finite"]):
            if t.nonfinite == "stop":
                raise metric_log.NonFiniteLossError(
                    f"non-finite loss or gradients at step {s} (loss={float(m['loss'])}, grad_norm="
                    f"{float(m['grad_norm'])}); the last checkpoint is unaffected. Lower train.learning_rate, or set "
                    f"train.nonfinite=skip to drop such updates")
            log.warning("step %d: non-finite loss or gradients; update skipped", s)
        acc.add(m)
        progress.update(1, loss=float(m["loss"]))

    def log_metrics() -> dict:
        nonlocal t_log, data_seconds
        now = time.perf_counter()
        n = max(acc.n, 1)
        summary = acc.summary()
        summary.update(
            step_time=(now - t_log) / n,
            examples_per_second=batch_size * n / max(now - t_log, 1e-9),
            data_time=data_seconds / n,
        )
        writer.write(step, summary)
        log.info("step %d: loss %.5f, grad_norm %.4g, lr %.3g, %.3f s/step", step, summary["loss"],
                 summary["grad_norm"], summary["learning_rate"], summary["step_time"])
        acc.reset()
        t_log, data_seconds = now, 0.0
        return summary

    try:
        while step < num_steps:
            t0 = time.perf_counter()
            local = next(data_it)
            data_seconds += time.perf_counter() - t0
            batch = tr.global_batch(local)
            if not tr.compiled:
                secs = tr.compile(state, frozen, batch)
                log.info("compiled the train step in %.1f s (tracing and lowering %.1f s)", secs, tr.lower_seconds)
                t_log = time.perf_counter()
            state, metrics = tr.train_step(state, frozen, batch)
            step += 1
            if run_t0 is None:
                run_t0 = time.perf_counter()
            else:
                run_steps += 1
            if pending is not None:
                check(pending)  # the previous step: usually finished already, so this rarely waits
            pending = (step, metrics)
            if step % log_every == 0 or step == num_steps:
                check(pending)
                pending = None
                last_metrics = log_metrics()
            if evaluator is not None and (step % eval_every == 0 or step == num_steps):
                ev = evaluator(state, frozen)
                writer.write(step, ev)
                log.info("step %d: eval_loss %.5f over %d clips (%.1f s)", step, ev["eval_loss"],
                         int(ev["eval_examples"]), ev["eval_seconds"])
            # Asked after the sync above, so a signal that came in during the step stops the run at this step.
            stop = watcher.reached(step)
            if step % every == 0 or step == num_steps or stop:
                if pending is not None:
                    check(pending)  # never checkpoint an update whose loss was not checked
                    pending = None
                    if stop:
                        last_metrics = log_metrics()
                ckpt.save(state, data_it.get_state() if hasattr(data_it, "get_state") else None, config)
            if stop:
                preempted = True
                ckpt.wait()
                log.warning("stopped at step %d on request; checkpoint %s saved", step, ckpt.step_path(step))
                break
        if pending is not None:
            check(pending)
        ckpt.wait()
    finally:
        progress.close()
    sps = run_steps / (time.perf_counter() - run_t0) if run_t0 is not None and run_steps else None
    return TrainResult(step=step, start_step=start_step, preempted=preempted, source="", last_metrics=last_metrics,
                       compile_seconds=tr.compile_seconds, steps_per_second=sps)
