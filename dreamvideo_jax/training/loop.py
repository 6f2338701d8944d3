"""`train_and_evaluate(config, workdir)`: the training loop behind `python -m dreamvideo_jax.train`.

Start-up (which checkpoint, config.resume, config.init_from or random init) is `training.startup`. The workdir is
locked while the loop runs (one trainer per workdir; the lock names its holder).

Saving: every `train.checkpoint_every` steps, at the last step, and when the process is asked to stop (SIGTERM,
Ctrl-C, or JAX's preemption notice on multi-process runs), after which the loop returns normally.

Evaluation: with `train.eval_every > 0` the loss on the first `train.eval_batches` batches of `data.eval_split`
(EMA weights, the same noise every time; `Evaluator`) is logged as `eval_loss` every `train.eval_every` steps and
at the last step.
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
from dreamvideo_jax.checkpoints.lock import Lock
from dreamvideo_jax.parallel.sharding import global_batch, to_host
from dreamvideo_jax.training import metric_log, startup
from dreamvideo_jax.training.trainer import Trainer

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # WORKDIR/adapter/: the LoRA adapters of the last step (lora.save), written at the end


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
                mask = global_batch({"mask": np.asarray(local["mask"])}, self.tr.mesh)["mask"]
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
    wd = startup.prepare_workdir(workdir)
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
        startup.check_compatible(stored_config, config, f"workdir {workdir}")
        startup.log_config_changes(stored_config, config)
    log.info("mesh %s over %d devices (%d processes); %d trainable parameter arrays%s", dict(tr.mesh.shape),
             tr.mesh.size, jax.process_count(), len(jax.tree.leaves(tr.abstract_state.params)),
             f" (LoRA rank {tr.system.lora.rank})" if tr.system.lora is not None else "")
    ckpt = checkpoints.Checkpointer(checkpoints.checkpoint_dir(os.fspath(wd)), keep=int(t.keep_checkpoints),
                                    keep_every=int(t.keep_every), use_async=bool(t.async_checkpointing))
    data_it = None
    writer = None
    try:
        state, frozen, data_state, source = startup.start_state(tr, config, wd, ckpt)
        checkpoints.write_workdir_config(os.fspath(wd), config)
        start_step = int(to_host(state.step))
        log.info("starting at step %d (%s)", start_step, source)

        data_it = data_iterator if data_iterator is not None else _data_iterator(config, None)
        if data_state is not None:
            data_it.set_state(data_state)
        writer = metric_log.MetricWriter(os.fspath(wd), resume_step=start_step)
        evaluator = Evaluator(tr, config) if int(t.get("eval_every", 0)) > 0 else None
        result = run_steps(tr, config, state, frozen, data_it, ckpt, writer, watcher, start_step, evaluator,
                           adapter_dir=os.fspath(wd / ADAPTER_DIR) if tr.system.lora is not None else None)
        result.source = source
        return result
    finally:
        if writer is not None:
            writer.close()
        if data_iterator is None and data_it is not None:
            _close(data_it)
        ckpt.close()


def save_adapter(tr: Trainer, state, directory: str) -> str:
    """Writes the LoRA adapters of `state` (EMA weights with `train.init_from_ema`, else the raw ones) as an
    adapter folder (`lora.save`); process 0 writes."""
    from dreamvideo_jax import lora as lora_lib
    from dreamvideo_jax.system import flatten

    tree = jax.device_get(state.ema if bool(tr.config.train.init_from_ema) else state.params)
    shapes = {p: tuple(s.shape) for p, s in flatten(tr.system.model_params(tr.abstract_params)).items()}
    if jax.process_index() == 0:
        lora_lib.save(directory, tree, tr.system.lora, shapes)
    return directory


def run_steps(tr: Trainer, config, state, frozen, data_it, ckpt: checkpoints.Checkpointer,
         writer: metric_log.MetricWriter,
         watcher: PreemptionWatcher, start_step: int, evaluator: Evaluator | None = None,
         adapter_dir: str | None = None) -> TrainResult:
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
        if adapter_dir is not None and step > start_step:
            save_adapter(tr, state, adapter_dir)
            log.info("wrote the LoRA adapters of step %d to %s", step, adapter_dir)
    finally:
        progress.close()
    sps = run_steps / (time.perf_counter() - run_t0) if run_t0 is not None and run_steps else None
    return TrainResult(step=step, start_step=start_step, preempted=preempted, source="", last_metrics=last_metrics,
                       compile_seconds=tr.compile_seconds, steps_per_second=sps)
