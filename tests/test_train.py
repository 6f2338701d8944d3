"""Training in process: sharding rules, 1 vs 8 devices, frozen params, overfitting, checkpoints across meshes,
a non-finite loss. The CLI, resume and multi-process tests are in test_train_cli.py (a separate file, so
pytest-xdist runs the two halves on different workers)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dreamvideo_jax.parallel import mesh as mesh_lib
from dreamvideo_jax.parallel import sharding as sh
from dreamvideo_jax.parallel import axes as ax
from dreamvideo_jax import checkpoints
from dreamvideo_jax.system import System, flatten
from dreamvideo_jax.training import loop
from dreamvideo_jax.training import metric_log
from dreamvideo_jax.training.trainer import Trainer
from train_common import eight, make_batch, one, train_config  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("fast_compile")

# ----------------------------------------------------------------------------------------------------------------
# Config checks and mesh / sharding rules (no compilation)


def test_config_checks_name_the_bad_key():
    from dreamvideo_jax.training.config import check_config

    check_config(train_config())
    for key, value, match in [("timestep_high_fraction", 1.5, "train.timestep_high_fraction=1.5"),
                              ("timestep_high_start", 1000, r"train.timestep_high_start=1000 must be in \[0, 1000\)"),
                              ("condition_dropout", 0.5, "train.condition_dropout=0.5")]:
        c = train_config()
        c.train[key] = value
        with pytest.raises(ValueError, match=match):
            check_config(c)
    c = train_config()
    c.model.retention.image_input, c.model.retention.reference_skip = "latent", True
    c.train.prediction_type = "x0"
    with pytest.raises(ValueError, match="no train.trainable pattern matches its gate 'reference_skip/gate'"):
        check_config(c)
    c.train.trainable = ("^unet/.*temp_convs", "^reference_skip/")
    check_config(c)
    c.train.prediction_type = "eps"
    with pytest.raises(ValueError, match="reference_skip=True .* needs train.prediction_type='x0', got 'eps'"):
        check_config(c)
    c = train_config()  # a misspelled key in a config file is an error, not a silently ignored setting
    c.train.learnig_rate = 1e-3
    with pytest.raises(ValueError, match=r"train: unknown config keys \['learnig_rate'\]"):
        check_config(c)
    c = train_config()
    c.diffusion.beta_sart = 0.001
    with pytest.raises(ValueError, match=r"diffusion: unknown config keys \['beta_sart'\]"):
        check_config(c)


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


def test_per_device_batch_scales_with_the_mesh():
    """`train.per_device_batch_size` makes one config run on any slice size (the global batch follows the mesh);
    a fixed global batch that does not divide the mesh is an error that names the way out."""
    c = train_config()
    c.train.per_device_batch_size = 2
    tr = Trainer(c, mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    assert c.train.batch_size == tr.config.train.batch_size == 8  # 2 per device x data 2 x fsdp 2
    c = train_config()
    c.train.batch_size = 12
    with pytest.raises(ValueError, match=r"batch_size=12 must be divisible by .* = 8 devices .*per_device_batch_size"):
        Trainer(c, mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))
    c.train.per_device_batch_size = -1
    with pytest.raises(ValueError, match=r"train.per_device_batch_size=-1 must be >= 0"):
        Trainer(c)


def test_sharding_rules_fall_back_and_big_leaves_are_sharded():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    cfg = train_config()
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
    system = System(cfg)
    shardings = sh.tree_shardings(system.boxed_abstract, mesh, rules, int(cfg.sharding.fsdp_min_size))
    abstract = system.abstract
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
    paths = System(train_config()).trainable_paths
    assert paths and all(p.startswith(("unet/", "retention/", "image_conv/")) for p in paths)
    unet = [p for p in paths if p.startswith("unet/")]
    assert unet and all(any(k in p for k in ("temp_convs", "temp_attentions", "transformer_in")) for p in unet)
    assert any(p.startswith("retention/") for p in paths) and any(p.startswith("image_conv/") for p in paths)
    cfg = train_config()
    cfg.train.trainable = ("^unet/no_such_layer",)
    with pytest.raises(ValueError, match="match no parameter"):
        System(cfg).trainable_paths


# ----------------------------------------------------------------------------------------------------------------
# In-process training on 1 and 8 devices


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
    batches = [make_batch(i) for i in range(3)]
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
    n_train = len(tr.system.trainable_paths)
    flat_params = flatten(jax.device_get(state.params))
    assert set(flat_params) == set(tr.system.trainable_paths)
    # Adam's mu and nu: one leaf per trainable param, nothing else of param size.
    opt_leaves = jax.tree.leaves(state.opt_state)
    big = [x for x in opt_leaves if np.ndim(x) > 0]
    assert len(big) == 2 * n_train
    n_frozen = len(flatten(frozen))
    assert n_frozen > 0 and n_train + n_frozen == len(flatten(params))
    # One layout: split halves carry the layout's paths and merge back to it.
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(tr.merge(*tr.split(params))),
                                     jax.device_get(params)))
    # Frozen base (text encoder, VAE) is sharded too.
    tr8 = Trainer(train_config(), mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    emb = tr8.frozen_shardings["text_encoder"]["embeddings"]["token_embedding"]["embedding"]
    assert not emb.is_fully_replicated


def test_overfits_one_batch(one):
    tr, params = one
    batch = make_batch(0)
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
    ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints", use_async=True)
    ckpt.save(state8, {"next_index": 24}, train_config())
    ckpt.close()
    expect = jax.device_get(state8)
    tr2 = Trainer(train_config(), mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2]))
    for tr in (one[0], tr2):
        c = checkpoints.Checkpointer(tmp_path / "checkpoints", read_only=True)
        r = c.restore_latest(tr.abstract_state)
        c.close()
        assert r.step == 3 and r.data_state == {"next_index": 24}
        leaf = jax.tree.leaves(r.state.params)[0]
        assert leaf.sharding.mesh.size == tr.mesh.size
        got = jax.device_get(r.state)
        assert jax.tree.all(jax.tree.map(np.array_equal, got, expect))


def test_nonfinite_loss_stops_naming_the_step(one, tmp_path):
    tr, params = one
    trainable, frozen = tr.split(params)
    state = tr.init_state(trainable)
    bad = make_batch(0)
    bad["video"][0, 0, 0, 0, 0] = np.nan

    class Data:
        def __next__(self):
            return bad

        def get_state(self):
            return {}

    c = checkpoints.Checkpointer(tmp_path / "checkpoints")
    w = metric_log.MetricWriter(str(tmp_path))
    watcher = loop.PreemptionWatcher()
    try:
        with pytest.raises(metric_log.NonFiniteLossError, match="at step 1 "):
            loop.run_steps(tr, tr.config, state, frozen, Data(), c, w, watcher, 0)
    finally:
        watcher.close()
        w.close()
        c.close()
    assert c.all_steps() == []  # nothing was saved after the bad update


def test_evaluator_gives_a_repeatable_eval_loss_of_the_ema_weights(one, runs, tmp_path):
    """The eval loss (train.eval_every) uses fixed noise: the same weights give the same number, other (EMA)
    weights another; a missing split fails when the evaluator is built, not hours into a run."""
    tr, params = one
    cfg = train_config(str(tmp_path / "tfds"))
    cfg.train.eval_every, cfg.train.eval_batches = 1, 1
    ev = loop.Evaluator(tr, cfg)
    trainable, frozen = tr.split(params)
    fresh = tr.init_state(trainable)
    a, b = ev(fresh, frozen), ev(fresh, frozen)
    assert a["eval_loss"] == b["eval_loss"] and a["eval_examples"] == 8 and np.isfinite(a["eval_loss"])
    trained = runs["one"][0]
    assert ev(trained, frozen)["eval_loss"] != a["eval_loss"]
    cfg.data.eval_split = "no_such_split"
    with pytest.raises(ValueError, match="train.eval_every=1 needs data.eval_split='no_such_split'"):
        loop.Evaluator(tr, cfg)
