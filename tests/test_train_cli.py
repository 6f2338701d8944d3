"""Training end to end through the CLI (subprocesses sharing a persistent compilation cache): exact resume after
SIGKILL and SIGTERM, resume order, a corrupt checkpoint, bad configs, 2-process training, init_from, the TPU launch
script's dry run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dreamvideo_jax import checkpoints
from dreamvideo_jax.errors import CheckpointError, IncompatibleConfigError, InputError, WorkdirError
from dreamvideo_jax.parallel import sharding as sh
from dreamvideo_jax.system import flatten
from dreamvideo_jax.training import loop, startup
import stand_ins
from train_common import (  # noqa: F401 (fixtures)
    EVERY, NUM_STEPS, ROOT, cli_overrides, eight, one, train_config)

pytestmark = pytest.mark.usefixtures("fast_compile")

# ----------------------------------------------------------------------------------------------------------------
# End to end through the CLI (subprocesses sharing a persistent compilation cache)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_e2e")
    data_dir = str(root / "tfds")
    from dreamvideo_jax.data import pipeline

    pipeline.dataset_path(train_config(data_dir).data)  # build the tiny moving_shapes once
    # One device; the suite's compilation cache when it has one (tests/test_readme.py's train command then
    # reuses this module's compiled train step).
    return {"root": root, "data_dir": data_dir, "env": stand_ins.cli_env(root / "jax_cache", devices=1)}


def _cmd(workdir, data_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "dreamvideo_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            *cli_overrides(data_dir), *extra]


def _popen(env, workdir, *extra) -> subprocess.Popen:
    log = open(f"{workdir}.log", "w")
    return subprocess.Popen(_cmd(workdir, env["data_dir"], *extra), cwd=ROOT, env=env["env"], stdout=log,
                            stderr=subprocess.STDOUT)


def _finish(p: subprocess.Popen, workdir, timeout=900) -> str:
    try:
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return open(f"{workdir}.log").read()


def _wait_for(cond, p: subprocess.Popen, what: str, timeout=900):
    t0 = time.time()
    while not cond():
        if p.poll() is not None:
            return False
        if time.time() - t0 > timeout:
            p.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return True


def _metric_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path).read().splitlines():
        try:
            out.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return out


def _read_checkpoint(workdir, step) -> dict:
    import orbax.checkpoint as ocp

    base = os.path.join(workdir, "checkpoints", str(step))
    out = {}
    with ocp.PyTreeCheckpointer() as c:
        for item in ("params", "ema", "opt_state", "meta"):
            meta = c.metadata(os.path.join(base, item))
            tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree),
                                is_leaf=lambda x: hasattr(x, "shape"))
            out[item] = c.restore(os.path.join(base, item), args=ocp.args.PyTreeRestore(restore_args=args))
    out["data"] = json.load(open(os.path.join(base, "data", "process_0-of-1.json")))
    return out


@pytest.fixture(scope="module")
def reference_run(env):
    """Uninterrupted 6 steps (checkpoints at 3 and 6)."""
    wd = str(env["root"] / "uninterrupted")
    out = _finish(_popen(env, wd), wd)
    assert "done: step 6" in out, out[-3000:]
    return wd


@pytest.mark.slow
def test_exact_resume_after_sigkill_and_sigterm(env, reference_run):
    wd = str(env["root"] / "interrupted")
    # 1. SIGKILL once checkpoint 3 is committed.
    p = _popen(env, wd)
    ok = _wait_for(lambda: os.path.isdir(os.path.join(wd, "checkpoints", "3")), p, "checkpoint 3")
    p.send_signal(signal.SIGKILL)
    out = _finish(p, wd)
    assert ok and p.returncode == -signal.SIGKILL, out[-3000:]
    # A kill can land after later steps were saved too; make the resume start at 3 in every case.
    for name in os.listdir(os.path.join(wd, "checkpoints")):
        if name != "3" and not name.startswith("_"):
            shutil.rmtree(os.path.join(wd, "checkpoints", name))
    # 2. Resume; Ctrl-C (SIGINT) while the step compiles: like SIGTERM, a checkpoint after the current step and a
    #    clean exit (JAX's own handler would swallow it during compilation and train on).
    p = _popen(env, wd)
    _wait_for(lambda: "starting at step 3" in open(f"{wd}.log").read(), p, "start-up")
    p.send_signal(signal.SIGINT)
    out = _finish(p, wd)
    assert p.returncode == 0 and "stopped on request" in out, out[-3000:]
    saved = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
    stop_step = max(_metric_steps(wd))
    assert saved[-1] == stop_step and 3 < stop_step < NUM_STEPS, (saved, stop_step)
    # 3. Resume to the end.
    out = _finish(_popen(env, wd), wd)
    assert f"done: step {NUM_STEPS} (started at {stop_step} from workdir)" in out, out[-3000:]
    a, b = _read_checkpoint(reference_run, NUM_STEPS), _read_checkpoint(wd, NUM_STEPS)
    for item in ("params", "ema", "opt_state", "meta"):
        same = jax.tree.map(np.array_equal, a[item], b[item])
        assert jax.tree.all(same), (item, same)
    assert a["data"] == b["data"]
    # The next data batch is the same too.
    from dreamvideo_jax.data import pipeline

    nexts = []
    for state in (a["data"]["state"], b["data"]["state"]):
        it = pipeline.make_train_iterator(train_config(env["data_dir"]).data, batch_size=8)
        it.set_state(state)
        nexts.append(next(it))
        it.close()
    assert all(np.array_equal(nexts[0][k], nexts[1][k]) for k in ("video", "tokens", "index"))
    # Logged losses of the steps after the interruptions match the uninterrupted run.
    la = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(reference_run, "metrics.jsonl")))}
    lb = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))}
    assert sorted(lb) == list(range(1, NUM_STEPS + 1)) and all(la[s] == lb[s] for s in lb)


def test_load_gives_the_layout_with_the_checkpoint_merged_in(reference_run):
    loaded = checkpoints.load(reference_run)
    assert loaded.config.train.mode == "dreamvideo" and loaded.step == NUM_STEPS
    assert set(loaded.params) == {"unet", "retention", "image_conv", "text_encoder", "vae"}
    ema = _read_checkpoint(reference_run, NUM_STEPS)["ema"]
    flat = flatten(loaded.params)
    for k, v in flatten(ema).items():
        assert np.array_equal(flat[k], v)
    raw = checkpoints.load(os.path.join(reference_run, "checkpoints", "3"), use_ema=False)
    assert raw.step == 3 and not np.array_equal(flatten(raw.params)[k], flat[k])
    with pytest.raises(InputError, match="--step=4: .* no checkpoint at that step"):
        checkpoints.load(reference_run, step=4)


def test_corrupt_checkpoint_is_an_error_or_a_logged_fallback(env, reference_run, eight, caplog):
    wd = str(env["root"] / "corrupt")
    shutil.copytree(reference_run, wd)
    params_dir = os.path.join(wd, "checkpoints", str(NUM_STEPS), "params")
    for dirpath, _, files in os.walk(params_dir):
        for f in files:
            if f != "_METADATA":
                with open(os.path.join(dirpath, f), "wb") as fh:
                    fh.write(b"\0garbage")
    with pytest.raises(CheckpointError, match=f"checkpoints/{NUM_STEPS}"):
        loop.train_and_evaluate(train_config(env["data_dir"]), wd)
    tr = eight[0]
    c = checkpoints.Checkpointer(checkpoints.checkpoint_dir(wd), use_async=False)
    with caplog.at_level("ERROR"):
        r = c.restore_latest(tr.abstract_state, on_corrupt="fallback")
    c.close()
    assert r.step == EVERY and any("cannot be restored" in m for m in caplog.messages)
    assert os.path.isdir(os.path.join(wd, "checkpoints_corrupt", str(NUM_STEPS)))


# Runs `python -m dreamvideo_jax.train` with a full disk under checkpoint STEP's temporary folder: every Python
# write there from a background thread (orbax's metadata writers; its arrays go through TensorStore) fails with
# ENOSPC, as when the disk fills up while the checkpoint is written in the background.
DISK_FULL_AT = """
import builtins, errno, os, runpy, sys, threading
_open = builtins.open
class _NoSpace:
    def __init__(self, f): self._f = f
    def __enter__(self): return self
    def __exit__(self, *exc): self._f.close()
    def __getattr__(self, name): return getattr(self._f, name)
    def write(self, data): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)
def open(file, mode="r", *args, **kwargs):
    f = _open(file, mode, *args, **kwargs)
    full = (isinstance(file, (str, os.PathLike)) and "/STEP.orbax-checkpoint-tmp" in os.fspath(file)
            and any(c in mode for c in "wax+") and threading.current_thread() is not threading.main_thread())
    return _NoSpace(f) if full else f
builtins.open = open
sys.argv[0] = "dreamvideo_jax.train"
runpy.run_module("dreamvideo_jax.train", run_name="__main__", alter_sys=True)
"""


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_complete_checkpoints(env, reference_run, tmp_path):
    """Checkpoint 2 fails in the background (async checkpointing); the save of 3 finds out: one line naming the
    step, exit status 1, checkpoint 1 intact and readable, the partial checkpoint 2 removed, no tracebacks."""
    wd = tmp_path / "full"
    cmd = [sys.executable, "-c", DISK_FULL_AT.replace("STEP", "2"), "--config=configs/tiny.py", f"--workdir={wd}",
           *cli_overrides(env["data_dir"]), "--config.train.num_steps=3", "--config.train.checkpoint_every=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=900)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 1, r.stderr[-3000:]
    assert lines[-1].startswith(f"error: no space left on device while writing checkpoint 2 to {wd}/checkpoints"), \
        lines[-1]
    assert "checkpoint 1 is complete and untouched" in lines[-1] and "rerun the same command" in lines[-1]
    assert "resumes from checkpoint 1" in lines[-1]
    assert "Traceback" not in r.stderr and "_SignalingThread" not in r.stderr, r.stderr[-3000:]
    names = os.listdir(wd / "checkpoints")
    assert "1" in names and not [n for n in names if n != "1" and n.split(".")[0] in ("2", "3")], names
    loaded = checkpoints.load(str(wd))
    assert loaded.step == 1 and "done: step" not in r.stdout


def test_disk_full_during_a_synchronous_save(tmp_path, monkeypatch):
    """Without async checkpointing the save itself fails: the same error, the same cleanup."""
    import builtins
    import errno
    import types

    c = checkpoints.Checkpointer(checkpoints.checkpoint_dir(str(tmp_path)), use_async=False)
    rng = np.random.default_rng(0)

    def state(step):
        p = {"w": rng.standard_normal((64, 8)).astype(np.float32)}
        return types.SimpleNamespace(params=p, ema=p, opt_state={"count": np.int32(step)}, step=np.int32(step),
                                     rng=np.zeros(2, np.uint32))

    first = state(1)
    c.save(first, {"pos": 1}, train_config())
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and "/2.orbax-checkpoint-tmp" in os.fspath(file) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(CheckpointError) as e:
        c.save(state(2), {"pos": 2}, train_config())
    monkeypatch.undo()
    c.close()
    msg = str(e.value)
    assert msg.startswith(f"no space left on device while writing checkpoint 2 to {tmp_path}/checkpoints") and \
        "\n" not in msg, msg
    assert "checkpoint 1 is complete and untouched" in msg
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    got = _read_checkpoint(str(tmp_path), 1)
    np.testing.assert_array_equal(got["params"]["w"], first.params["w"])
    assert got["data"]["state"] == {"pos": 1}


def test_disk_full_is_recognised_through_wrappers():
    import errno

    from dreamvideo_jax.errors import disk_full

    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/c/3.orbax-checkpoint-tmp/x": Failed to '
                             "write 13604 bytes to file 9: No space left on device [os_error_code='28']")
    assert disk_full(tensorstore) == "no space left on device"
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk quota exceeded"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("commit failed") from inner
    except RuntimeError as outer:
        assert disk_full(outer) == "no space left on device"
    assert disk_full(ExceptionGroup("writes", [KeyError("a"), OSError(errno.ENOSPC, "x")])) == "no space left on device"
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None and disk_full(ValueError("bad")) is None


def test_resume_order(env, reference_run, eight, tmp_path):
    """workdir checkpoint -> config.resume -> config.init_from -> scratch (no step is compiled here)."""
    tr = eight[0]
    cfg = train_config(env["data_dir"])
    cfg.resume = os.path.join(reference_run, "checkpoints", str(EVERY))
    cfg.init_from = reference_run  # ignored: resume comes first
    wd = tmp_path / "resumed"
    wd.mkdir()
    c = checkpoints.Checkpointer(checkpoints.checkpoint_dir(str(wd)))
    state, frozen, data_state, source = startup.start_state(tr, cfg, wd, c)
    assert source == "resume" and int(sh.to_host(state.step)) == EVERY and data_state is not None
    expect = _read_checkpoint(reference_run, EVERY)
    got = flatten(jax.device_get(state.params))
    assert all(np.array_equal(got[k], v) for k, v in flatten(expect["params"]).items())
    assert checkpoints.is_base(str(wd / "base"))  # the new workdir is self-contained
    # With a checkpoint of its own, the workdir comes first.
    c.save(state.replace(step=state.step + 1), data_state, cfg)
    c.wait()
    state, _, _, source = startup.start_state(tr, cfg, wd, c)
    assert source == "workdir" and int(sh.to_host(state.step)) == EVERY + 1
    c.close()
    # init_from alone: a fresh state (step 0) whose trainable params are the source's EMA.
    cfg.resume = ""
    c = checkpoints.Checkpointer(checkpoints.checkpoint_dir(str(tmp_path / "fresh")))
    state, _, data_state, source = startup.start_state(tr, cfg, tmp_path / "fresh", c)
    c.close()
    assert source == "init_from" and int(sh.to_host(state.step)) == 0 and data_state is None
    ema = flatten(_read_checkpoint(reference_run, NUM_STEPS)["ema"])
    got = flatten(jax.device_get(state.params))
    assert all(np.array_equal(got[k], ema[k]) for k in got)


def test_resume_refuses_another_objective_and_a_busy_workdir(env, reference_run):
    for section, key, value in (("train", "prediction_type", "v"), ("diffusion", "beta_schedule", "linear")):
        cfg = train_config(env["data_dir"])
        cfg[section][key] = value
        with pytest.raises(IncompatibleConfigError, match=rf"{section}.{key}: '\w+' -> '{value}'"):
            loop.train_and_evaluate(cfg, reference_run)
    # Another trainer holds the workdir: refused with who holds it, before anything is read or written.
    from dreamvideo_jax.checkpoints.lock import Lock

    before = open(os.path.join(reference_run, "metrics.jsonl")).read()
    with Lock(os.path.join(reference_run, ".lock"), "test holder"):
        with pytest.raises(WorkdirError, match=rf"workdir {reference_run} is in use by another process \(host "
                                               rf".*, pid {os.getpid()}"):
            loop.train_and_evaluate(train_config(env["data_dir"]), reference_run)
    assert open(os.path.join(reference_run, "metrics.jsonl")).read() == before


def test_incompatible_config_unwritable_workdir_unknown_key(env, reference_run, tmp_path):
    cfg = train_config(env["data_dir"])
    cfg.model.unet.layers_per_block = 2
    cfg.train.trainable = ("^unet/",)
    with pytest.raises(IncompatibleConfigError, match="model.unet.layers_per_block: 1 -> 2") as e:
        loop.train_and_evaluate(cfg, reference_run)
    assert "train.trainable" in str(e.value)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(WorkdirError, match="not writable"):
        loop.train_and_evaluate(train_config(env["data_dir"]), str(blocker / "workdir"))
    r = subprocess.run(_cmd(tmp_path / "wd", env["data_dir"], "--config.train.no_such_key=1"), cwd=ROOT,
                       env=env["env"], capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode != 0 and lines[-1].startswith("error:") and "no_such_key" in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(env):
    wd = str(env["root"] / "two_process")
    port = _free_port()
    procs = []
    try:
        for i in range(2):
            log = open(f"{wd}.{i}.log", "w")
            cmd = _cmd(wd, env["data_dir"], "--config.train.mode=t2v", "--config.train.num_steps=2",
                       "--config.train.checkpoint_every=2", "--multihost", f"--coordinator_address=localhost:{port}",
                       "--num_processes=2", f"--process_id={i}")
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env["env"], stdout=log, stderr=subprocess.STDOUT))
        for p in procs:
            p.wait(timeout=1200)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [open(f"{wd}.{i}.log").read() for i in range(2)]
    return wd, procs, outs


@pytest.mark.slow
def test_two_processes(two_process_run):
    wd, procs, outs = two_process_run
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "done: step 2" in out, out[-3000:]
    losses = [[ln for ln in out.splitlines() if ln.startswith("done:")][-1].split("loss ")[-1] for out in outs]
    assert losses[0] == losses[1]
    data = os.path.join(wd, "checkpoints", "2", "data")
    assert sorted(os.listdir(data))[-2:] == ["process_0-of-2.json", "process_1-of-2.json"]
    states = [json.load(open(os.path.join(data, f"process_{i}-of-2.json"))) for i in range(2)]
    assert states[0]["state"] == states[1]["state"]  # same position, different shards of the data
    assert [r["step"] for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))] == [1, 2]


def test_init_from_t2v_workdir_copies_unet_into_retention(two_process_run, one):
    wd = two_process_run[0]
    loaded = checkpoints.load(wd)
    config, variables = loaded.config, loaded.params
    assert config.train.mode == "t2v" and set(variables) == {"unet", "text_encoder", "vae"}
    tr = one[0]
    params = jax.device_get(startup.load_init_from(tr, wd, jax.random.key(1)))
    assert jax.tree.all(jax.tree.map(np.array_equal, params["unet"], variables["unet"]))
    assert jax.tree.all(jax.tree.map(np.array_equal, params["text_encoder"], variables["text_encoder"]))
    for k in ("conv_in", "time_embedding", "down_blocks_0", "mid_block"):
        assert jax.tree.all(jax.tree.map(np.array_equal, params["retention"][k], variables["unet"][k]))
    # A base checkpoint written by save_base loads the same way.
    base = os.path.join(os.path.dirname(wd), "converted_base")
    checkpoints.save_base(base, {k: variables[k] for k in ("unet", "text_encoder", "vae")}, config.model)
    stored, model_config = checkpoints.load_base(base)
    assert model_config.unet.block_out_channels == list(config.model.unet.block_out_channels)
    assert jax.tree.all(jax.tree.map(np.array_equal, stored["unet"], variables["unet"]))
    params2 = jax.device_get(startup.load_init_from(tr, base, jax.random.key(1)))
    model_groups = ("unet", "retention", "image_conv")
    assert jax.tree.all(jax.tree.map(np.array_equal, {k: params2[k] for k in model_groups},
                                     {k: params[k] for k in model_groups}))


def test_init_from_t2v_source_ignores_retention_settings_but_not_unet_ones():
    """A text-to-video source has no retention branch, so stage 2 may choose any branch settings."""
    src, cfg = train_config(), train_config()
    src.train.mode = "t2v"
    cfg.model.retention.image_input = "latent"
    startup.check_source_model(src.model, cfg, "init_from workdir w", source_has_branch=False)
    with pytest.raises(IncompatibleConfigError, match="model.retention.image_input"):
        startup.check_source_model(src.model, cfg, "init_from workdir w", source_has_branch=True)
    cfg.model.unet.layers_per_block = int(src.model.unet.layers_per_block) + 1
    with pytest.raises(IncompatibleConfigError, match="model.unet.layers_per_block"):
        startup.check_source_model(src.model, cfg, "init_from workdir w", source_has_branch=False)


def test_tpu_launch_dry_run():
    cmd = ["bash", os.path.join(ROOT, "launch", "tpu", "pod.sh"), "all", "--dry_run", "--name=dv", "--zone=us-central2-b",
           "--project=proj", "--accelerator=v4-32", "--version=tpu-ubuntu2204-base", "--workdir=gs://b/runs/dv",
           "--data_dir=gs://b/tfds", "--init_from=gs://b/base/ms", "--extra=--config.train.batch_size=64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # The slice's programs are compiled here first (XLA:TPU through libtpu), before any TPU is created.
    assert "-m dreamvideo_jax.aot " in lines[0] and "--topology=v4-32 --program=train" in lines[0], lines[0]
    assert "--config.train.batch_size=64" in lines[0] and "--config=configs/modelscope_t2v.py" in lines[0]
    assert lines[1] == ("+ gcloud compute tpus tpu-vm create dv --zone=us-central2-b --project=proj "
                        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
    assert any(ln.startswith("+ gcloud compute tpus tpu-vm scp ") and "--worker=all" in ln for ln in lines)
    train = [ln for ln in lines if "dreamvideo_jax.train" in ln]
    assert len(train) == 1 and "--worker=all" in train[0] and "--multihost" in train[0]
    for part in ("--workdir=gs://b/runs/dv", "--config.data.data_dir=gs://b/tfds", "--config.init_from=gs://b/base/ms",
                 "--config.train.batch_size=64", "--config=configs/modelscope_t2v.py"):
        assert part in train[0]
    bad = subprocess.run(cmd[:2] + ["train", "--dry_run", "--name=dv", "--zone=z", "--workdir=/tmp/x",
                                    "--data_dir=gs://d"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "gs://" in bad.stderr
