"""Ahead-of-time compilation for TPU slices (`python -m dreamvideo_jax.aot`), through libtpu's topology
descriptions: the tiny config's train step and sampling programs compiled by XLA:TPU for one v5e chip, the JSON
report against XLA's own analyses, and the bad inputs. Full-size compiles are benchmark commands, not tests."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from dreamvideo_jax.aot import chips, programs
from dreamvideo_jax.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"


def _libtpu_devices():
    try:
        return programs.topology_devices(chips.parse(TOPOLOGY))
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        return e


@pytest.fixture(scope="module")
def tpu_devices():
    """The devices of a v5e 2x2 slice, or a skip naming why libtpu cannot describe them."""
    for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(k, v)
    devices = _libtpu_devices()
    if isinstance(devices, Exception):
        pytest.skip(f"libtpu cannot describe a TPU topology here: {devices}")
    return devices


@pytest.fixture(scope="module")
def fast_tpu_compile():
    """XLA's expensive optimisation passes off (as the CPU tests do): the figures asserted here are structural."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _cli(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "dreamvideo_jax.aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_slice_names():
    assert chips.parse("v5e:4x4").chips == 16
    assert chips.parse("v5litepod-16").topology == "v5e:4x4"
    assert chips.parse("v4-32").topology == "v4:2x2x4"  # accelerator types count TensorCores: 16 chips
    assert chips.parse("v5p-8").topology == "v5p:2x2x1"
    assert chips.parse("v6e-8").topology == "v6e:2x4"
    assert chips.parse("v4-8").options == (("chip_config_name", "megacore"),)
    for bad, match in [("v9-8", "unknown TPU generation 'v9'"), ("v4:2x2", "3 dimensions"),
                       ("v5e-6", "6 chips"), ("tpu", "expected a topology such as v5e:4x4")]:
        with pytest.raises(InputError, match=match):
            chips.parse(bad)


def test_largest_values_reads_compiled_hlo():
    text = """
  %fusion.1 = f32[48,5,4096,4096]{3,2,1,0} fusion(f32[48,4096,320]{2,1,0} %p), kind=kLoop
  %param.2 = f32[1000,1000]{1,0} parameter(2)
  ROOT %tuple = (f32[2]{0}) tuple(%x)
  %convolution.3 = bf16[16,32,32,320]{3,2,1,0} convolution(%a, %b), window={size=3x3}
"""
    top = programs.largest_values(text)
    assert top[0] == {"name": "fusion.1", "op": "fusion", "shape": "f32[48,5,4096,4096]", "bytes": 48 * 5 * 4096 * 4096 * 4}
    assert [v["op"] for v in top] == ["fusion", "convolution"]  # parameters are the arguments, not buffers


def test_train_step_for_one_v5e_chip(tpu_devices, fast_tpu_compile):
    config = tiny.get_config()
    config.train.per_device_batch_size = 2
    reports, facts, tr = programs.compile_train(config, tpu_devices[:1])
    (train,) = reports
    assert facts["global_batch"] == 2 and facts["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    # The report's figures are XLA:TPU's memory analysis of the Trainer's own compiled step.
    assert tr.compiled and "TPU" in tr.mesh.devices.flat[0].device_kind
    mem = tr.memory_analysis()
    assert (train.argument_bytes, train.output_bytes, train.alias_bytes, train.temp_bytes) == (
        mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes, mem.temp_size_in_bytes)
    assert train.alias_bytes > 0  # the train state is donated: updated in place
    assert train.flops > 0 and train.bytes_accessed > 0
    report = programs.summarize(config, "train", chips.parse(TOPOLOGY), 1, reports, facts)
    assert report["fits"] and report["peak_bytes"] == train.peak_bytes < chips.CHIPS["v5e"].hbm_bytes
    assert report["roofline_seconds"] == max(train.flops / 197e12, train.bytes_accessed / 819e9)
    assert 0 < report["mfu_bound"] <= 1
    json.dumps(report)  # the report is JSON


def test_sampling_programs_are_the_ones_a_real_call_runs(tpu_devices, fast_tpu_compile):
    """Sampler.lower's programs compile for TPU, and on CPU they are exactly what generate() runs: once they are
    lowered, a real call of the same shape traces and lowers none of them again (JAX's caches hit: the same
    jaxpr and the same StableHLO)."""
    config = tiny.get_config()
    reports, facts = programs.compile_sample(config, tpu_devices[:1], batch=1, num_frames=4, height=16, width=16)
    assert [r.name for r in reports] == ["encode_text", "prepare", "step", "decode"]
    assert facts["guidance_rows"] == 3 and all(r.peak_bytes > 0 for r in reports)
    step = reports[2]
    assert step.flops > 0 and step.temp_bytes > 0

    from dreamvideo_jax.sampling.pipeline import Sampler
    from dreamvideo_jax.system import System

    sampler = Sampler(config, System(config).random_params(0))
    kwargs = dict(num_frames=4, height=16, width=16, steps=2)
    for lowered in sampler.lower(1, **kwargs).values():
        lowered.compile()
    messages = []  # a handler on JAX's own logger: whatever other tests did to the root logger does not matter

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler, jax_logger = Collect(level=logging.WARNING), logging.getLogger("jax")
    jax_logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        video = sampler.generate(np.zeros((16, 16, 3), np.uint8), "a red circle moves left", **kwargs)
        jax.jit(lambda x: x * 3 + 1)(np.float32(2))  # the log is seen: a function never seen before is compiled
    finally:
        jax.config.update("jax_log_compiles", False)
        jax_logger.removeHandler(handler)
    lowered = [m for m in messages if m.startswith("Compiling jit(")]
    assert video.shape == (1, 4, 16, 16, 3)
    assert any("jit(<lambda>)" in m for m in lowered), lowered
    assert not [m for m in lowered if any(f"jit({n})" in m for n in ("_step_impl", "prepare", "decode",
                                                                      "encode_text"))], lowered


def test_cli_bad_inputs_are_one_line_errors(tmp_path):
    r = _cli("--config=configs/tiny.py", "--topology=v9-8")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "error: --topology=v9-8: unknown TPU generation 'v9'; known: v4, v5e, v5p, v6e")
    r = _cli("--config=configs/tiny.py")
    assert r.returncode == 2 and "error: --topology=None: is required" in r.stderr
    r = _cli("--config=configs/tiny.py", "--topology=v5e:2x2", "--headroom=1.5")
    assert r.returncode == 2 and "error: --headroom=1.5: must be in [0, 1)" in r.stderr
    # Without libtpu (a package of that name that fails to import shadows it), the error says what to install.
    shim = tmp_path / "shim" / "libtpu"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('libtpu is absent')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), ROOT]), "TPU_LIBRARY_PATH": ""}
    r = _cli("--config=configs/tiny.py", "--topology=v5e:2x2", env_extra=env)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        'error: compiling for TPU needs libtpu, which is not installed: pip install -e ".[tpu]"'), r.stderr


def test_search_picks_the_fastest_setting_that_fits():
    """The search's logic with a stand-in compiler: settings that do not fit or cannot be laid out are passed
    over, and among the rest the best clips/s per chip wins (a larger per-chip batch at a longer step can win)."""
    from dreamvideo_jax.aot.programs import ProgramReport

    def fake_compile(cfg, devices):
        per, remat = cfg.train.per_device_batch_size, cfg.model.remat
        if cfg.mesh.tensor == 2:
            raise ValueError("tensor=2 does not divide the heads")
        peak = (6 if remat else 16) * per * 2**30
        flops = (40 + 60 * per) * 1e12 * (1.3 if remat else 1.0)  # fixed costs: larger batches pay off
        rep = ProgramReport("train_step", peak, 0, 0, 0, 0, flops, 1e9, 0, None, 0.0, 1.0, [])
        return [rep], {"global_batch": per * len(devices), "mesh": {}}

    log = []
    found = programs.search(tiny.get_config(), chips.parse("v5e-4"), [None] * 4, compile_fn=fake_compile,
                            log=log.append)
    best = found["best"]
    # v5e has 16 GiB, 10% kept free: without remat not even 1 clip fits (16 GiB); with remat 1 and 2 clips
    # fit (6, 12 GiB), 4 do not (24 GiB), and 2 clips per step give more clips per second.
    assert best["overrides"]["model.remat"] is True and best["overrides"]["train.per_device_batch_size"] == 2
    assert best["flags"].startswith("--config.model.remat=True --config.train.per_device_batch_size=2")
    assert any(line.startswith("skip") and "tensor=2" in line for line in log)
    assert {r["fits"] for r in found["results"]} == {True, False}
