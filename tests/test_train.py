"""Training: sharding rules, 1 vs 8 devices, frozen params, overfitting, checkpoints across meshes, exact resume
after SIGKILL and SIGTERM (subprocesses), 2-process training, errors, init_from, TPU launch dry run.

Compilation dominates the cost on CPU, so the tests share compiled functions through module-scoped fixtures,
compile with `jax_disable_most_optimizations`, and the subprocess runs share a persistent compilation cache.
"""

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

from configs import tiny
from dreamvideo_jax.parallel import mesh as mesh_lib
from dreamvideo_jax.parallel import sharding as sh
from dreamvideo_jax.parallel import axes as ax
from dreamvideo_jax.training import checkpoint as ck
from dreamvideo_jax.training import loop
from dreamvideo_jax.training import metrics as mt
from dreamvideo_jax.training import state as st
from dreamvideo_jax.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, EVERY = 6, 3


def _config(data_dir: str = ""):
    """configs/tiny.py with a short constant-lr schedule (the overfitting test shares this compiled step)."""
    c = tiny.get_config()
    t = c.train
    t.num_steps, t.checkpoint_every, t.log_every = NUM_STEPS, EVERY, 1
    t.learning_rate, t.warmup_steps, t.lr_schedule = 1e-2, 0, "constant"
    # Adam's first steps are sign descent: with eps=1e-8 a gradient element within float noise of zero moves
    # by +-lr on one mesh and -+lr on another. A larger eps keeps updates Lipschitz in the gradients, so
    # 1-vs-8-device results agree to float noise.
    t.adam_eps = 1e-4
    t.progress_bar = False
    if data_dir:
        c.data.data_dir = data_dir
    return c


def _cli_overrides(data_dir: str) -> list[str]:
    return [f"--config.train.num_steps={NUM_STEPS}", f"--config.train.checkpoint_every={EVERY}",
            "--config.train.log_every=1", "--config.train.learning_rate=0.01", "--config.train.warmup_steps=0",
            "--config.train.lr_schedule=constant", "--config.train.adam_eps=1e-4", "--config.train.progress_bar=False",
            f"--config.data.data_dir={data_dir}"]


def _batch(seed: int = 0, b: int = 8) -> dict:
    """A structured fixed batch: a bright square moving one pixel per frame on a flat background."""
    rng = np.random.default_rng(seed)
    v = np.full((b, 4, 16, 16, 3), -0.5, np.float32)
    for i in range(b):
        for f in range(4):
            v[i, f, 4 + f : 9 + f, 3 + i % 6 : 8 + i % 6, i % 3] = 0.8
    return {"video": v, "image": v[:, 0], "tokens": rng.integers(0, 49408, (b, 77)).astype(np.int32)}


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


# ----------------------------------------------------------------------------------------------------------------
# Mesh and sharding rules (no compilation)


def test_mesh_sizes_and_errors():
    assert mesh_lib.resolve_axis_sizes({"data": -1, "fsdp": 4, "tensor": 1}, 8) == (2, 4, 1)
    assert mesh_lib.resolve_axis_sizes({"data": 1, "fsdp": -1}, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="at most one axis"):
        mesh_lib.resolve_axis_sizes({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="need 6 devices"):
        mesh_lib.resolve_axis_sizes({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        mesh_lib.resolve_axis_sizes({"model": 2}, 8)
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_sharding_rules_fall_back_and_big_leaves_are_sharded():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    cfg = _config()
    rules = mesh_lib.rules_from_config(cfg.sharding)
    P = jax.sharding.PartitionSpec
    kernel = (ax.KERNEL_SPACE, ax.KERNEL_SPACE, ax.CONV_IN, ax.CONV_OUT)
    assert sh.logical_to_spec(kernel, (3, 3, 32, 64), mesh, rules) == P(None, None, "fsdp")
    # 3 input channels do not divide over 4 devices: that dimension is replicated instead of failing.
    assert sh.logical_to_spec(kernel, (3, 3, 3, 16), mesh, rules) == P()
    # ... unless the safety net finds another divisible dimension of a large leaf.
    assert sh.logical_to_spec(kernel, (3, 3, 3, 4096), mesh, rules, fsdp_min_size=1000) == P(None, None, None, "fsdp")
    assert sh.logical_to_spec((ax.NORM,), (6,), mesh, rules) == P()
    assert sh.logical_to_spec(None, (4096, 8), mesh, rules, fsdp_min_size=1000) == P("fsdp")
    comps = st.build_components(cfg)
    shardings = sh.tree_shardings(comps.abstract, mesh, rules, int(cfg.sharding.fsdp_min_size))
    abstract = sh.unbox(comps.abstract)
    emb = shardings["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    assert abstract["text_encoder"]["embeddings"]["token_embedding"]["embedding"].shape == (49408, 32)
    assert not emb.is_fully_replicated
    frac = sh.sharded_fraction(shardings, abstract)
    assert frac > 0.9, frac
    # Every leaf with at least fsdp_min_size elements is sharded.
    for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
        if np.prod(a.shape) >= cfg.sharding.fsdp_min_size:
            assert not s.is_fully_replicated, a.shape


def test_trainable_selection():
    comps = st.build_components(_config())
    paths = comps.trainable_paths
    assert paths and all(p.startswith(("unet/", "retention/", "image_conv/")) for p in paths)
    unet = [p for p in paths if p.startswith("unet/")]
    assert unet and all(any(k in p for k in ("temp_convs", "temp_attentions", "transformer_in")) for p in unet)
    assert any(p.startswith("retention/") for p in paths) and any(p.startswith("image_conv/") for p in paths)
    cfg = _config()
    cfg.train.trainable = ("^unet/no_such_layer",)
    with pytest.raises(ValueError, match="match no parameter"):
        st.build_components(cfg)


# ----------------------------------------------------------------------------------------------------------------
# In-process training on 1 and 8 devices


@pytest.fixture(scope="module")
def one():
    """1-device trainer, its initial params and a fresh state's trainable copy."""
    tr = Trainer(_config(), mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    params = tr.init_params(jax.random.key(0))
    return tr, params


@pytest.fixture(scope="module")
def eight():
    tr = Trainer(_config(), mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    params = tr.init_params(jax.random.key(0))
    return tr, params


def _train(tr: Trainer, params: dict, batches: list[dict]):
    trainable, frozen = tr.split(params)
    state = tr.init_state(trainable)
    losses = []
    with tr.context():
        for b in batches:
            state, m = tr.train_step(state, frozen, tr.global_batch(b))
            losses.append(float(m["loss"]))
    return state, frozen, losses


@pytest.fixture(scope="module")
def runs(one, eight):
    batches = [_batch(i) for i in range(3)]
    out = {}
    for name, (tr, params) in (("one", one), ("eight", eight)):
        state, frozen, losses = _train(tr, params, batches)
        out[name] = (state, frozen, losses)
    return out


def test_init_is_mesh_independent_and_sharded(one, eight):
    p1, p8 = jax.device_get(one[1]), jax.device_get(eight[1])
    assert jax.tree.all(jax.tree.map(np.array_equal, p1, p8))
    emb = eight[1]["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    assert len({str(s.index) for s in emb.addressable_shards}) == 4  # rows split over fsdp=4, replicated over data=2


def test_one_vs_eight_devices_same_loss_and_params(runs):
    (s1, _, l1), (s8, _, l8) = runs["one"], runs["eight"]
    np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-6)
    assert int(s1.step) == int(s8.step) == 3
    for a, b in ((s1.params, s8.params), (s1.ema, s8.ema)):
        diff = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
        assert max(jax.tree.leaves(diff)) <= 1e-5, max(jax.tree.leaves(diff))
    # Params actually moved.
    assert l1[0] != l1[2]


def test_frozen_unchanged_and_optimizer_holds_only_trainable(one, runs):
    tr, params = one
    state, frozen, _ = runs["one"]
    _, frozen0 = tr.split(params)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), frozen0, frozen))
    n_train = len(tr.comps.trainable_paths)
    flat_params = st.flatten(jax.device_get(state.params))
    assert set(flat_params) == set(tr.comps.trainable_paths)
    # Adam's mu and nu: one leaf per trainable param, nothing else of param size.
    opt_leaves = jax.tree.leaves(state.opt_state)
    big = [x for x in opt_leaves if np.ndim(x) > 0]
    assert len(big) == 2 * n_train
    n_frozen = len(st.flatten(frozen["model"]))
    assert n_frozen > 0 and n_train + n_frozen == len(st.flatten(params["model"]))
    # Frozen base (text encoder, VAE) is sharded too.
    tr8 = Trainer(_config(), mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    emb = tr8.frozen_shardings["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    assert not emb.is_fully_replicated


def test_overfits_one_batch(one):
    tr, params = one
    batch = _batch(0)
    trainable, frozen = tr.split(params)
    state = tr.init_state(trainable)
    gb = tr.global_batch(batch)
    losses = []
    with tr.context():
        for _ in range(40):
            state, m = tr.train_step(state, frozen, gb)
            losses.append(float(m["loss"]))
    first, last = np.mean(losses[:3]), np.mean(losses[-5:])
    assert last <= 0.5 * first, (first, last, np.round(losses, 3))


def test_checkpoint_from_8_devices_restores_on_1_and_2(tmp_path, runs, one):
    state8 = runs["eight"][0]
    ckpt = ck.Checkpointer(tmp_path / "checkpoints", use_async=True)
    ckpt.save(state8, {"next_index": 24}, _config())
    ckpt.close()
    expect = jax.device_get(state8)
    tr2 = Trainer(_config(), mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2]))
    for tr in (one[0], tr2):
        c = ck.Checkpointer(tmp_path / "checkpoints", read_only=True)
        r = c.restore_latest(tr.abstract_state)
        c.close()
        assert r.step == 3 and r.data_state == {"next_index": 24}
        leaf = jax.tree.leaves(r.state.params)[0]
        assert leaf.sharding.mesh.size == tr.mesh.size
        got = jax.device_get(r.state)
        assert jax.tree.all(jax.tree.map(np.array_equal, got, expect))


# ----------------------------------------------------------------------------------------------------------------
# End to end through the CLI (subprocesses sharing a persistent compilation cache)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_e2e")
    data_dir = str(root / "tfds")
    from dreamvideo_jax.data import pipeline

    pipeline.dataset_path(_config(data_dir).data)  # build the tiny moving_shapes once
    e = dict(os.environ)
    flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    e.update(
        PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""),
        XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=1"]),
        JAX_PLATFORMS="cpu",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    return {"root": root, "data_dir": data_dir, "env": e}


def _cmd(workdir, data_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "dreamvideo_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
            *_cli_overrides(data_dir), *extra]


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
    # 2. Resume; SIGTERM after the first new step: a checkpoint at the current step, clean exit.
    p = _popen(env, wd)
    _wait_for(lambda: "step 4: loss" in open(f"{wd}.log").read(), p, "step 4")
    p.send_signal(signal.SIGTERM)
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
        it = pipeline.make_train_iterator(_config(env["data_dir"]).data, batch_size=8)
        it.set_state(state)
        nexts.append(next(it))
        it.close()
    assert all(np.array_equal(nexts[0][k], nexts[1][k]) for k in ("video", "tokens", "index"))
    # Logged losses of the steps after the interruptions match the uninterrupted run.
    la = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(reference_run, "metrics.jsonl")))}
    lb = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))}
    assert sorted(lb) == list(range(1, NUM_STEPS + 1)) and all(la[s] == lb[s] for s in lb)


def test_load_for_inference_layout(reference_run):
    config, variables = ck.load_for_inference(reference_run)
    assert config.train.mode == "dreamvideo" and set(variables) == {"dreamvideo", "text_encoder", "vae"}
    assert set(variables["dreamvideo"]) == {"unet", "retention", "image_conv"}
    ema = _read_checkpoint(reference_run, NUM_STEPS)["ema"]
    flat = st.flatten(variables["dreamvideo"])
    for k, v in st.flatten(ema).items():
        assert np.array_equal(flat[k], v)
    _, raw = ck.load_for_inference(reference_run, step=3, use_ema=False)
    assert not np.array_equal(st.flatten(raw["dreamvideo"])[k], flat[k])


def test_corrupt_checkpoint_is_an_error_or_a_logged_fallback(env, reference_run, eight, caplog):
    wd = str(env["root"] / "corrupt")
    shutil.copytree(reference_run, wd)
    params_dir = os.path.join(wd, "checkpoints", str(NUM_STEPS), "params")
    for dirpath, _, files in os.walk(params_dir):
        for f in files:
            if f != "_METADATA":
                with open(os.path.join(dirpath, f), "wb") as fh:
                    fh.write(b"\0garbage")
    with pytest.raises(ck.CheckpointError, match=f"checkpoints/{NUM_STEPS}"):
        loop.train_and_evaluate(_config(env["data_dir"]), wd)
    tr = eight[0]
    c = ck.Checkpointer(ck.checkpoint_dir(wd), use_async=False)
    with caplog.at_level("ERROR"):
        r = c.restore_latest(tr.abstract_state, on_corrupt="fallback")
    c.close()
    assert r.step == EVERY and any("cannot be restored" in m for m in caplog.messages)
    assert os.path.isdir(os.path.join(wd, "checkpoints_corrupt", str(NUM_STEPS)))


def test_resume_order(env, reference_run, eight, tmp_path):
    """workdir checkpoint -> config.resume -> config.init_from -> scratch (no step is compiled here)."""
    tr = eight[0]
    cfg = _config(env["data_dir"])
    cfg.resume = os.path.join(reference_run, "checkpoints", str(EVERY))
    cfg.init_from = reference_run  # ignored: resume comes first
    wd = tmp_path / "resumed"
    wd.mkdir()
    c = ck.Checkpointer(ck.checkpoint_dir(str(wd)))
    state, frozen, data_state, source = loop._start(tr, cfg, wd, c)
    assert source == "resume" and int(sh.to_host(state.step)) == EVERY and data_state is not None
    expect = _read_checkpoint(reference_run, EVERY)
    got = st.flatten(jax.device_get(state.params))
    assert all(np.array_equal(got[k], v) for k, v in st.flatten(expect["params"]).items())
    assert ck.is_base(str(wd / "base"))  # the new workdir is self-contained
    # With a checkpoint of its own, the workdir comes first.
    c.save(state.replace(step=state.step + 1), data_state, cfg)
    c.wait()
    state, _, _, source = loop._start(tr, cfg, wd, c)
    assert source == "workdir" and int(sh.to_host(state.step)) == EVERY + 1
    c.close()
    # init_from alone: a fresh state (step 0) whose trainable params are the source's EMA.
    cfg.resume = ""
    c = ck.Checkpointer(ck.checkpoint_dir(str(tmp_path / "fresh")))
    state, _, data_state, source = loop._start(tr, cfg, tmp_path / "fresh", c)
    c.close()
    assert source == "init_from" and int(sh.to_host(state.step)) == 0 and data_state is None
    ema = st.flatten(_read_checkpoint(reference_run, NUM_STEPS)["ema"])
    got = st.flatten(jax.device_get(state.params))
    assert all(np.array_equal(got[k], ema[k]) for k in got)


def test_nonfinite_loss_stops_naming_the_step(one, tmp_path):
    tr, params = one
    trainable, frozen = tr.split(params)
    state = tr.init_state(trainable)
    bad = _batch(0)
    bad["video"][0, 0, 0, 0, 0] = np.nan

    class Data:
        def __next__(self):
            return bad

        def get_state(self):
            return {}

    c = ck.Checkpointer(tmp_path / "checkpoints")
    w = mt.MetricWriter(str(tmp_path))
    watcher = loop.PreemptionWatcher()
    try:
        with pytest.raises(mt.NonFiniteLossError, match="at step 1 "):
            loop._run(tr, tr.config, state, frozen, Data(), c, w, watcher, 0)
    finally:
        watcher.close()
        w.close()
        c.close()
    assert c.all_steps() == []  # nothing was saved after the bad update


def test_incompatible_config_unwritable_workdir_unknown_key(env, reference_run, tmp_path):
    cfg = _config(env["data_dir"])
    cfg.model.unet.layers_per_block = 2
    cfg.train.trainable = ("^unet/",)
    with pytest.raises(loop.IncompatibleConfigError, match="model.unet.layers_per_block: 1 -> 2") as e:
        loop.train_and_evaluate(cfg, reference_run)
    assert "train.trainable" in str(e.value)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(loop.WorkdirError, match="not writable"):
        loop.train_and_evaluate(_config(env["data_dir"]), str(blocker / "workdir"))
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
    config, variables = ck.load_for_inference(wd)
    assert config.train.mode == "t2v" and set(variables) == {"unet", "text_encoder", "vae"}
    tr = one[0]
    params = jax.device_get(loop.load_init_from(tr, wd, jax.random.key(1)))
    assert jax.tree.all(jax.tree.map(np.array_equal, params["model"]["unet"], variables["unet"]))
    assert jax.tree.all(jax.tree.map(np.array_equal, params["text_encoder"], variables["text_encoder"]))
    for k in ("conv_in", "time_embedding", "down_blocks_0", "mid_block"):
        assert jax.tree.all(jax.tree.map(np.array_equal, params["model"]["retention"][k], variables["unet"][k]))
    # A base checkpoint written by save_base loads the same way.
    base = os.path.join(os.path.dirname(wd), "converted_base")
    ck.save_base(base, {k: variables[k] for k in ("unet", "text_encoder", "vae")}, config.model)
    loaded, model_config = ck.load_base(base)
    assert model_config.unet.block_out_channels == list(config.model.unet.block_out_channels)
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded["unet"], variables["unet"]))
    params2 = jax.device_get(loop.load_init_from(tr, base, jax.random.key(1)))
    assert jax.tree.all(jax.tree.map(np.array_equal, params2["model"], params["model"]))


def test_init_from_t2v_source_ignores_retention_settings_but_not_unet_ones():
    """A text-to-video source has no retention branch, so stage 2 may choose any branch settings."""
    src, cfg = _config(), _config()
    src.train.mode = "t2v"
    cfg.model.retention.image_input = "latent"
    loop._check_model_config(src.model, cfg, "init_from workdir w", source_has_branch=False)
    with pytest.raises(loop.IncompatibleConfigError, match="model.retention.image_input"):
        loop._check_model_config(src.model, cfg, "init_from workdir w", source_has_branch=True)
    cfg.model.unet.layers_per_block = int(src.model.unet.layers_per_block) + 1
    with pytest.raises(loop.IncompatibleConfigError, match="model.unet.layers_per_block"):
        loop._check_model_config(src.model, cfg, "init_from workdir w", source_has_branch=False)


def test_tpu_launch_dry_run():
    cmd = ["bash", os.path.join(ROOT, "launch", "tpu", "pod.sh"), "all", "--dry_run", "--name=dv", "--zone=us-central2-b",
           "--project=proj", "--accelerator=v4-32", "--version=tpu-ubuntu2204-base", "--workdir=gs://b/runs/dv",
           "--data_dir=gs://b/tfds", "--init_from=gs://b/base/ms", "--extra=--config.train.batch_size=64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == ("+ gcloud compute tpus tpu-vm create dv --zone=us-central2-b --project=proj "
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

