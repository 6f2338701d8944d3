"""LoRA adapters: targets, zero-init identity, stacking, training (only A/B change, bitwise resume), adapter
files, sampling merged vs unmerged, the merge command, and one-line errors for bad inputs.

One tiny LoRA trainer (two devices) is compiled once for the module; every training run goes through the loop's
own start-up and step code with it.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from etils import epath

from configs import tiny
from dreamvideo_jax import checkpoints
from dreamvideo_jax import lora
from dreamvideo_jax.lora import __main__ as lora_cli
from dreamvideo_jax.errors import CheckpointError, InputError, UserError
from dreamvideo_jax.parallel import mesh as mesh_lib
from dreamvideo_jax.system import System, flatten
from dreamvideo_jax.training import loop
from dreamvideo_jax.training.trainer import Trainer
from train_common import make_batch, train_config

pytestmark = pytest.mark.usefixtures("fast_compile")

RANK = 4
STEPS = 4


def lora_config(**lora_keys):
    c = train_config()
    c.train.lora.rank = RANK
    c.train.lora.alpha = 8.0
    c.train.batch_size = 2
    c.train.checkpoint_every = 2
    c.train.async_checkpointing = False
    for k, v in lora_keys.items():
        c.train.lora[k] = v
    return c


class Data:
    """Batch i is make_batch(i); resumable."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return make_batch(self.i, b=2)

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = int(s["i"])


def _train(tr, config, workdir: str, num_steps: int):
    c = config.copy_and_resolve_references()
    c.train.num_steps = num_steps
    watcher = loop.PreemptionWatcher()
    try:
        return loop._train_locked(tr, c, epath.Path(workdir), workdir, Data(), watcher)
    finally:
        watcher.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step LoRA run on top of a base of random weights (`init_from`; every layer non-zero, so every adapter
    gets a gradient), and a copy of it cut back to its step-2 checkpoint and resumed from its workdir."""
    root = tmp_path_factory.mktemp("lora")
    config = lora_config()
    system = System(config)
    start = str(root / "start")
    checkpoints.save_base(start, system.random_params(seed=3), config.model)
    config.init_from = start
    # Two devices, the frozen base sharded over 'fsdp' (model.sharding rules) and the adapters replicated.
    tr = Trainer(config, mesh_lib.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2]))
    a, b = str(root / "a"), str(root / "b")
    full = _train(tr, config, a, STEPS)
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, checkpoints.CHECKPOINT_DIR, str(STEPS)))
    shutil.rmtree(os.path.join(b, loop.ADAPTER_DIR))
    resumed = _train(tr, config, b, STEPS)
    return dict(tr=tr, config=config, a=a, b=b, full=full, resumed=resumed, root=root, start=start)


# ----------------------------------------------------------------------------------------------------------------
# Targets and the update (no training)


@pytest.fixture(scope="module")
def system():
    return System(lora_config())


def test_presets_select_kernels_and_bad_targets_fail_naming_them(system):
    model = system.model_params(system.abstract)
    att = lora.match(model, ["attention"])
    assert att and all(p.startswith("unet/") and p.rsplit("/", 2)[-2] in ("to_q", "to_k", "to_v", "to_out_0")
                       for p in att)
    temporal = lora.match(model, ["temporal"])
    assert any("temp_convs" in p for p in temporal) and not any("/resnets_" in p for p in temporal)
    branch = lora.match(model, ["branch"])
    assert branch and all(p.split("/")[0] in ("retention", "image_conv") for p in branch)
    assert set(flatten(system.lora_abstract)) == {f"{p}/{f}" for p in att for f in "ab"}
    with pytest.raises(ValueError, match=r"train.lora.targets: 'nothing_here' matches no Dense or convolution "
                                         r"kernel \(paths look like 'unet/"):
        Trainer(lora_config(targets=("nothing_here",)), mesh_lib.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
    with pytest.raises(ValueError, match=r"train.lora.targets: '\(' is neither a preset"):
        lora.match(model, ["("])
    c = lora_config()
    c.train.lora.dropout = 0.1
    with pytest.raises(ValueError, match=r"train.lora: unknown config keys \['dropout'\]"):
        Trainer(c)


def test_fresh_adapter_changes_nothing_and_stacking_adds_deltas(system):
    params = system.random_params(seed=1)
    fresh = lora.init(system.lora_abstract, jax.random.key(0))
    assert all(np.all(np.asarray(b) == 0) for _, b in lora.pairs(fresh).values())
    for merged in (lora.apply(jax.tree.map(np.asarray, params), [(jax.device_get(fresh), 2.0)]),
                   jax.jit(system.combine)(fresh, params)):  # host merge and the train step's traced merge
        for k, v in flatten(params).items():
            np.testing.assert_array_equal(np.asarray(flatten(merged)[k]), v, err_msg=k)
    # Two adapters stacked = the sum of their updates.
    rng = np.random.default_rng(0)
    t1, t2 = [jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), system.lora_abstract)
              for _ in range(2)]
    base = {k: params[k] for k in system.model_groups}
    one = flatten(lora.apply(base, [(t1, 0.5)]))
    two = flatten(lora.apply(base, [(t2, -1.5)]))
    both = flatten(lora.apply(base, [(t1, 0.5), (t2, -1.5)]))
    flat = flatten(base)
    changed = 0
    for k, w in flat.items():
        np.testing.assert_allclose(both[k] - w, (one[k] - w) + (two[k] - w), rtol=0, atol=1e-5, err_msg=k)
        changed += int(not np.array_equal(both[k], w))
    assert changed == len(lora.pairs(t1))


# ----------------------------------------------------------------------------------------------------------------
# Training


def test_only_the_adapters_train_and_the_base_stays_frozen(runs, system):
    tr, a = runs["tr"], runs["a"]
    assert runs["full"].step == STEPS and runs["full"].source == "init_from"
    raw, _ = checkpoints.load_trainable(a, STEPS, use_ema=False)
    fresh = jax.device_get(tr.init_adapters())
    assert set(flatten(raw)) == set(flatten(system.lora_abstract))
    for path, (a_new, b_new) in lora.pairs(raw).items():
        a0, b0 = lora.pairs(fresh)[path]
        assert np.any(b_new != 0) and not np.array_equal(a_new, a0), path  # both factors moved
    # The base is sharded over the mesh like any frozen weights; the adapters are replicated.
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(tr.frozen_shardings))
    assert all(s.is_fully_replicated for s in jax.tree.leaves(tr.trainable_shardings))
    # Optimizer state: only for A and B (AdamW's two moments each, plus scalar counts).
    opt_leaves = [x for x in jax.tree.leaves(tr.abstract_state.opt_state) if np.ndim(x) > 0]
    assert sum(int(np.prod(x.shape)) for x in opt_leaves) == 2 * lora.num_params(system.lora_abstract)
    # The frozen weights the run trained against are init_from's, copied to its base/ and never updated.
    base, _ = checkpoints.load_base(os.path.join(a, checkpoints.BASE_DIR))
    start, _ = checkpoints.load_base(runs["start"])
    assert set(flatten(base)) == set(flatten(start))
    for k, v in flatten(base).items():
        np.testing.assert_array_equal(v, flatten(start)[k], err_msg=k)


def test_resume_is_bitwise(runs):
    assert runs["resumed"].source == "workdir" and runs["resumed"].start_step == 2 and runs["resumed"].step == STEPS
    for ema in (False, True):
        x, _ = checkpoints.load_trainable(runs["a"], STEPS, ema)
        y, _ = checkpoints.load_trainable(runs["b"], STEPS, ema)
        for k, v in flatten(x).items():
            np.testing.assert_array_equal(v, flatten(y)[k], err_msg=k)
    # Another rank is another architecture: resuming with it is refused, naming the key.
    from dreamvideo_jax.errors import IncompatibleConfigError
    from dreamvideo_jax.training import startup

    other = lora_config(rank=8)
    with pytest.raises(IncompatibleConfigError, match="train.lora.rank"):
        startup.check_compatible(checkpoints.read_workdir_config(runs["a"]), other, "workdir")


def test_init_from_a_lora_workdir_starts_from_its_merged_weights(runs):
    """A new run (full or LoRA) from a LoRA run's workdir starts from that run's base with its adapters (EMA)
    merged in."""
    from dreamvideo_jax.training import startup

    tr = runs["tr"]
    params = jax.device_get(startup.load_init_from(tr, runs["a"], jax.random.key(0)))
    ema, _ = checkpoints.load_trainable(runs["a"], STEPS, use_ema=True)
    base, _ = checkpoints.load_base(os.path.join(runs["a"], checkpoints.BASE_DIR))
    want = flatten(lora.apply(base, [(ema, 2.0)]))  # alpha 8 / rank 4
    got = flatten(params)
    assert set(got) == set(want)
    moved = 0
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=1e-6, err_msg=k)
        moved += int(not np.array_equal(v, flatten(base)[k]))
    assert moved == len(lora.pairs(ema))


def test_adapter_file_round_trips_with_peft_names(runs, system, tmp_path):
    adapter_dir = os.path.join(runs["a"], loop.ADAPTER_DIR)
    ema, _ = checkpoints.load_trainable(runs["a"], STEPS, use_ema=True)
    ad = lora.load(adapter_dir)
    assert ad.rank == RANK and ad.alpha == 8.0 and ad.factor == 2.0 and ad.targets == ("attention",)
    for k, v in flatten(ema).items():
        np.testing.assert_array_equal(flatten(ad.tree)[k], v, err_msg=k)
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(adapter_dir, lora.WEIGHTS_FILE))
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert tensors[f"{name}.lora_A.weight"].shape == (RANK, 16) and tensors[f"{name}.lora_B.weight"].shape == (16, RANK)
    meta = json.loads(open(os.path.join(adapter_dir, lora.CONFIG_FILE)).read())
    assert meta["peft_type"] == "LORA" and meta["r"] == RANK and meta["lora_alpha"] == 8.0 and name in meta["target_modules"]
    # Convolutions (temporal preset): peft's conv layout, A (r, I, *k), B (O, r, 1, ...), and back.
    model = system.model_params(system.abstract)
    spec = lora.Spec(RANK, 0.0, ("temporal",))
    rng = np.random.default_rng(0)
    tree = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), lora.abstract(model, spec))
    shapes = {p: tuple(s.shape) for p, s in flatten(model).items()}
    lora.save(str(tmp_path / "t"), tree, spec, shapes)
    back = lora.load(str(tmp_path / "t" / lora.WEIGHTS_FILE))
    conv = "unet.down_blocks.0.temp_convs.0.conv1.2.lora_A.weight"
    assert load_file(str(tmp_path / "t" / lora.WEIGHTS_FILE))[conv].shape == (RANK, 16, 3, 1, 1)
    for k, v in flatten(tree).items():
        np.testing.assert_array_equal(flatten(back.tree)[k], v, err_msg=k)
    # The export command writes the same adapter as the run.
    assert lora_cli.main(["export", f"--workdir={runs['a']}", f"--dst={tmp_path / 'exported'}"]) == 0
    again = lora.load(str(tmp_path / "exported"))
    for k, v in flatten(ad.tree).items():
        np.testing.assert_array_equal(flatten(again.tree)[k], v, err_msg=k)


# ----------------------------------------------------------------------------------------------------------------
# Sampling and merging


def test_sampling_merged_equals_unmerged_and_merge_command(runs, tmp_path):
    from dreamvideo_jax.sampling import runner

    from PIL import Image

    image = str(tmp_path / "ref.png")
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(image)
    adapter = os.path.join(runs["a"], loop.ADAPTER_DIR)
    base = os.path.join(runs["a"], checkpoints.BASE_DIR)
    cfg = runs["config"]

    def sample(name, **kw):
        out = str(tmp_path / f"{name}.npz")
        opts = runner.Options(checkpoint=kw.pop("checkpoint", base), image=image, prompt="a square", output=out,
                              progress=False, overrides={"sample.steps": 2}, **kw)
        runner.run(opts, cfg, echo=lambda *a: None)
        with np.load(out) as z:
            return z["latents"]

    plain = sample("plain")
    merged = sample("merged", lora=(f"{adapter}:3",))
    unmerged = sample("unmerged", lora=(f"{adapter}:3",), lora_merge=False)
    # 1e-5 relative to the latents' scale (they reach |4| after 2 steps): the two programs add W + AB in different
    # places, so float32 rounding differs by a few ulps; a missing or doubled adapter differs by > 1e-3 (below).
    scale = float(np.max(np.abs(merged)))
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=1e-5 * max(1.0, scale))
    assert np.max(np.abs(merged - plain)) > 1e-3  # the adapter (x3) changes the samples
    # Scale 0 is the base model.
    np.testing.assert_allclose(sample("zero", lora=(f"{adapter}:0",), lora_merge=False), plain, rtol=0, atol=1e-5)
    # The merge command writes the merged weights as a base checkpoint.
    dst = str(tmp_path / "merged_ckpt")
    assert lora_cli.main(["merge", f"--base={base}", f"--lora={adapter}:3", f"--dst={dst}"]) == 0
    written = flatten(checkpoints.load(dst).params)
    want = flatten(lora.apply(checkpoints.load(base).params, lora.stack(lora.load_all([f"{adapter}:3"]))))
    for k, v in want.items():
        np.testing.assert_allclose(written[k], v, rtol=0, atol=1e-6, err_msg=k)
    # The LoRA workdir itself samples with its adapters merged (the same weights as base + adapter x1).
    loaded = checkpoints.load(runs["a"])
    want = flatten(lora.apply(checkpoints.load(base).params, lora.stack(lora.load_all([adapter]))))
    for k, v in want.items():
        np.testing.assert_allclose(flatten(loaded.params)[k], v, rtol=0, atol=1e-6, err_msg=k)


def test_bad_adapters_fail_with_one_line_naming_the_problem(runs, system, tmp_path, capsys):
    adapter = os.path.join(runs["a"], loop.ADAPTER_DIR)
    model = system.model_params(system.abstract)

    def one_line(exc_type, fn, match):
        with pytest.raises(exc_type, match=match) as e:
            fn()
        assert "\n" not in str(e.value) and isinstance(e.value, UserError)
        return str(e.value)

    one_line(InputError, lambda: lora.load_all([str(tmp_path / "nope") + ":0.5"]),
             r"^--lora=.*nope: no such file or directory$")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(InputError, lambda: lora.load(str(empty)), "not an adapter: .*adapter_model.safetensors is missing")
    # Rank mismatch between the config and the tensors.
    bad = tmp_path / "rank"
    shutil.copytree(adapter, bad)
    meta = json.loads((bad / lora.CONFIG_FILE).read_text())
    meta["r"] = 8
    (bad / lora.CONFIG_FILE).write_text(json.dumps(meta))
    one_line(CheckpointError, lambda: lora.load(str(bad)), r"rank mismatch: adapter_config.json says r=8 but "
             r"unet\.\S+\.lora_A\.weight is \(4, ")
    # An adapter of another model (wider U-Net): the first mis-shaped key is named.
    wide = tiny.get_config()
    wide.model.unet.block_out_channels = (24, 32)
    ws = System(wide)
    wm = ws.model_params(ws.abstract)
    spec = lora.Spec(RANK, 0.0, ("attention",))
    tree = jax.device_get(lora.init(lora.abstract(wm, spec), jax.random.key(0)))
    lora.save(str(tmp_path / "wide"), tree, spec, {p: tuple(s.shape) for p, s in flatten(wm).items()})
    msg = one_line(CheckpointError, lambda: lora.load_all([str(tmp_path / "wide")], model),
                   r"does not fit the model: unet\.down_blocks\.0\.\S+\.lora_A\.weight \(4, 24\)")
    assert "(16, 16)" in msg
    # ... and the merge command reports a bad adapter on one `error:` line (exit status 1; 2 for a bad flag).
    capsys.readouterr()
    assert lora_cli.main(["merge", f"--base={runs['a']}", f"--lora={tmp_path / 'wide'}", f"--dst={tmp_path / 'm'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: adapter ") and err.count("\n") == 1 and "does not fit the model" in err
    assert lora_cli.main(["merge", f"--base={runs['a']}", f"--lora={tmp_path / 'nope'}", f"--dst={tmp_path / 'm'}"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
