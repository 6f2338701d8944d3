"""README.md's commands run, at tiny scale: every ```bash block is parsed when the tests run
(tests/readme_commands.py, which also holds the substitution table: gs://BUCKET/, /path/to/, /data/ and runs/demo
map to local folders, `python` to this interpreter, configs/modelscope_t2v.py to configs/tiny.py), so a README
edit that breaks a command fails here. The README's flags are kept as printed; tiny-scale flags are appended.

Where each command runs (`test_every_readme_command_is_covered` fails on a command this table does not know):

    data.build (webvid, UCF-101)  here: tiny video folders -> gs://BUCKET/tfds, gs://BUCKET/tfds_eval
    train                         here: configs/tiny.py from gs://BUCKET/base/modelscope, on gs://BUCKET/tfds
    sample (step 4), evaluate     here, from that trained workdir (evaluate on the UCF-101 build)
    pod.sh all                    here with --dry_run (gcloud is absent); the train command it prints builds its
                                  Trainer (full-size config, abstract) on the slice's chip count of CPU devices
    convert                       tests/test_convert_snapshot.py: its fixture runs the README command on a tiny
                                  diffusers snapshot (built with torch) that its tests check in detail
    demo.sh, the demo's sample    tests/test_demo.py: the shortened demo through `bash launch/demo.sh`, then the
                                  sample command on its stage-2 workdir (one demo run for the suite, not two)
    launch/test.sh                not run: it is the command that runs this suite (CI), so it is covered by CI

Stand-ins: /data/webvid holds two 16x16 lossless clips with captions.csv, /data/UCF-101 two classes of one clip
each; gs://BUCKET/base/modelscope is a base checkpoint of configs/tiny.py's architecture (random weights; a
converted tiny diffusers snapshot cannot be it: diffusers' UNet3D has 8 temporal heads, tiny.py 2); cat.jpg is
written by the test. Appended flags (APPEND below): train 2 steps with the train-CLI tests' settings (their
compiled train step is reused through the suite's compilation cache) on `video_folder` data (what
configs/modelscope_t2v.py trains on); sample and evaluate 2 steps; evaluate 2 clips. data.build runs as printed
(256x256 from 16x16 clips takes about a second).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

import stand_ins
from readme_commands import ROOT, Sandbox, commands, find
from train_common import cli_overrides

# Commands of the README, by name (and printed flags where a name has several), and where each runs.
COVERAGE = [
    (("dreamvideo_jax.data.build", {}), "here"),
    (("dreamvideo_jax.train", {}), "here"),
    (("dreamvideo_jax.sample", {"config": "configs/modelscope_t2v.py"}), "here"),
    (("dreamvideo_jax.evaluate", {}), "here"),
    (("launch/tpu/pod.sh", {}), "here"),
    (("dreamvideo_jax.convert", {}), "tests/test_convert_snapshot.py"),
    (("launch/demo.sh", {}), "tests/test_demo.py"),
    (("dreamvideo_jax.sample", {"config": "configs/demo_shapes.py"}), "tests/test_demo.py"),
    (("launch/test.sh", {}), "CI (the command that runs this suite)"),
]

STEPS = 2
APPEND = {
    "dreamvideo_jax.train": [*cli_overrides(None), f"--config.train.num_steps={STEPS}",
                             "--config.data.dataset=video_folder"],
    "dreamvideo_jax.sample": [f"--config.sample.steps={STEPS}", "--noprogress"],
    "dreamvideo_jax.evaluate": ["--num_samples=2", f"--config.sample.steps={STEPS}", "--noprogress"],
}


def _covered_by(command) -> list[str]:
    return [where for (name, flags), where in COVERAGE
            if command.name == name and all(command.flags.get(k) == v for k, v in flags.items())]


def test_every_readme_command_is_covered():
    cmds = commands()
    assert len(cmds) >= 10, [str(c) for c in cmds]
    for c in cmds:
        assert len(_covered_by(c)) == 1, f"{c}\nis not covered by exactly one entry of COVERAGE in {__file__}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    sb = Sandbox(tmp_path_factory.mktemp("readme"))
    stand_ins.video_folder(sb.path("/data/webvid"), names=("a.mkv", "b.mkv"),
                           rows=["a.mkv,a red square moves left", "b.mkv,a blue ball bounces"])
    stand_ins.ucf101_folder(sb.path("/data/UCF-101"))
    from configs import tiny

    stand_ins.base_checkpoint(sb.path("gs://BUCKET/base/modelscope"), tiny.get_config())
    stand_ins.image(sb.work / "cat.jpg", 40, 30)
    sb.env = stand_ins.cli_env(sb.root / "jax_cache", devices=1)
    return sb


def _run(sb, command, **kw):
    return sb.run(command, APPEND.get(command.name, []), env=sb.env, **kw)


@pytest.fixture(scope="module")
def built(sandbox):
    """Both data.build commands: the training build and the UCF-101 evaluation build."""
    out = {}
    for c in commands():
        if c.name == "dreamvideo_jax.data.build":
            proc = _run(sandbox, c)
            out[c.flags["data_dir"]] = proc.stdout
    return out


@pytest.fixture(scope="module")
def trained(sandbox, built):
    c = find("dreamvideo_jax.train")
    proc = _run(sandbox, c)
    return c, proc


def test_data_build(sandbox, built):
    import tensorflow_datasets as tfds

    assert set(built) == {"gs://BUCKET/tfds", "gs://BUCKET/tfds_eval"}
    webvid = [ln for ln in built["gs://BUCKET/tfds"].splitlines() if ln.startswith("SUMMARY")][-1]
    assert "config=256x256_32f_stride1 written=2 skipped=0" in webvid, webvid
    path = sandbox.path("gs://BUCKET/tfds/video_folder/256x256_32f_stride1/1.0.0")
    rec = tfds.builder_from_directory(str(path)).as_data_source("train")[0]
    assert rec["video"].shape == (8, 256, 256, 3) and rec["caption"] in (b"a red square moves left",
                                                                           b"a blue ball bounces")
    ucf = [ln for ln in built["gs://BUCKET/tfds_eval"].splitlines() if ln.startswith("SUMMARY")][-1]
    assert "config=ucf101 written=2" in ucf and "validation=2" in ucf, ucf
    path = sandbox.path("gs://BUCKET/tfds_eval/video_folder/ucf101/1.0.0")
    captions = sorted(r["caption"] for r in tfds.builder_from_directory(str(path)).as_data_source("validation"))
    assert captions == [b"apply eye makeup", b"basketball"]


def test_train(sandbox, trained):
    c, proc = trained
    assert f"done: step {STEPS} (started at 0 from init_from)" in proc.stdout, proc.stdout[-2000:]
    wd = sandbox.path(c.flags["workdir"])
    assert (wd / "checkpoints" / str(STEPS)).is_dir() and (wd / "base").is_dir()
    stored = json.loads((wd / "config.json").read_text())
    assert stored["init_from"] == str(sandbox.path("gs://BUCKET/base/modelscope"))
    assert stored["data"]["dataset"] == "video_folder"
    assert stored["data"]["data_dir"] == str(sandbox.path("gs://BUCKET/tfds"))


def test_sample(sandbox, trained):
    import imageio.v3 as iio

    proc = _run(sandbox, find("dreamvideo_jax.sample", config="configs/modelscope_t2v.py"))
    assert f"step {STEPS}, EMA weights" in proc.stdout, proc.stdout
    video = iio.imread(sandbox.work / "cat.mp4", index=None, plugin="pyav")
    assert video.shape == (4, 16, 16, 3)
    meta = json.loads((sandbox.work / "cat.json").read_text())
    assert meta["prompts"] == ["a cat turns its head"] and (sandbox.work / "cat.png").exists()


def test_evaluate(sandbox, trained, built):
    _run(sandbox, find("dreamvideo_jax.evaluate"))
    m = json.loads((sandbox.work / "metrics.json").read_text())
    p = m["protocol"]
    assert (p["dataset"], p["config_name"], p["split"]) == ("ucf101", "ucf101", "validation")
    assert p["num_videos"] == 2 and p["checkpoint_step"] == STEPS and p["steps"] == STEPS
    assert (p["image_guidance"], p["text_guidance"]) == (1.5, 7.5)
    assert np.isfinite(m["metrics"]["fff_ssim"]) and "fvd" in m["skipped"]


def tpu_chips(accelerator: str) -> int:
    """Chips of a Cloud TPU slice type: v2/v3/v4/v5p names count TensorCores (2 per chip), v5e/v6e chips."""
    kind, n = accelerator.rsplit("-", 1)
    return int(n) // 2 if kind in ("v2", "v3", "v4", "v5p") else int(n)


def _train_flags(line: str) -> list[str]:
    """The flags of `python -m dreamvideo_jax.train` inside a printed `gcloud ... ssh --command=...` line."""
    command = [w.split("=", 1)[1] for w in shlex.split(line.removeprefix("+ ")) if w.startswith("--command=")]
    assert len(command) == 1, line
    words = shlex.split(command[0])
    i = words.index("dreamvideo_jax.train") + 1
    out = []
    for w in words[i:]:
        if w in ("&", "&&", ";", "|", "<") or w.startswith(">") or w[:1].isdigit() and ">" in w:
            break
        out.append(w)
    return out


TRAINER_ON_A_SLICE = """
import json, sys
import jax
import ml_collections
from absl import flags
from dreamvideo_jax import config_io, train  # train: the command's flags
flags.FLAGS(["train", *sys.argv[1:]])
from dreamvideo_jax.training.trainer import Trainer
config = ml_collections.ConfigDict(config_io.to_dict(flags.FLAGS.config))  # as train_and_evaluate copies it
tr = Trainer(config)
print(json.dumps({"devices": jax.device_count(), "mesh": dict(tr.mesh.shape),
                  "batch_size": int(config.train.batch_size)}))
"""


def test_tpu_pod_command(sandbox):
    c = find("launch/tpu/pod.sh")
    f = c.flags
    proc = sandbox.run(c, ["--dry_run"], local=False)
    lines = proc.stdout.splitlines()  # one `+ command` line each; other lines may come and go
    create = [ln for ln in lines if " tpu-vm create " in ln]
    assert len(create) == 1, proc.stdout
    for part in (f" create {f['name']} ", f"--zone={f['zone']}", f"--accelerator-type={f['accelerator']}",
                 f"--version={f['version']}"):
        assert part in create[0], (part, create[0])
    train = [ln for ln in lines if "-m dreamvideo_jax.train " in ln]
    assert train, proc.stdout
    for part in (f"--workdir={f['workdir']}", f"--config.data.data_dir={f['data_dir']}",
                 f"--config.init_from={f['init_from']}", "--multihost", f"--zone={f['zone']}", "--worker=all"):
        assert part in train[-1], (part, train[-1])

    # The printed train command's config (configs/modelscope_t2v.py at full size, with pod.sh's overrides) on the
    # slice's chip count: its mesh and global batch must fit (abstract shapes only; nothing large is allocated).
    chips = tpu_chips(f["accelerator"])
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={chips}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", TRAINER_ON_A_SLICE, *_train_flags(train[-1])], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["devices"] == chips
    assert got["mesh"]["data"] * got["mesh"]["fsdp"] * got["mesh"]["tensor"] == chips
    assert got["batch_size"] % (got["mesh"]["data"] * got["mesh"]["fsdp"]) == 0
