"""Smoke tests of `python -m benchmarks`: `fullsize` (abstract shapes), the measured suites on tiny shapes
in-process (timing the library's `Trainer.train_step` and `Sampler`), the data and sampling-loop suites, and the
`config` suite's arguments. No timing is asserted."""

import dataclasses
import importlib.util
import json

import pytest
from absl import app

from benchmarks import cli, common, data, model, sampling
from dreamvideo_jax.sampling import outputs
from dreamvideo_jax.sampling.pipeline import Sampler
from dreamvideo_jax.training.trainer import Trainer


def _positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_fullsize_suite_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    cli.main(["--suite=fullsize", f"--output={out}"])
    printed = capsys.readouterr().out
    assert "fullsize" in printed and "v5p-8" in printed

    res = json.loads(out.read_text())
    assert set(res) >= {"machine", "fullsize"} and res["complete"] is True
    assert res["machine"]["cores"] >= 1 and res["machine"]["jax"]
    assert res["machine"]["freed_memory_retained"] is False
    r = res["fullsize"]
    p, f = r["params"], r["flops"]
    # Primary U-Net (~1.4e9 at ms-1.7b size) + retention branch copy of its encoder half.
    assert 1.5e9 < p["total"] < 3e9
    assert 0 < p["trainable"] < p["total"]
    assert p["part_unet"] + p["part_retention"] + p["part_image_conv"] == p["total"]
    assert p["text_encoder"] > 0 and p["vae"] > 0
    for k in ("train_step_per_video", "sampling_step_per_video_3_branches", "sampling_25_ddim_per_video"):
        assert _positive(f[k]), k
    # One sampling step runs the model on 3 branches; a train step is forward + backward of one.
    assert f["sampling_step_per_video_3_branches"] > f["train_step_per_video"] / 3
    assert set(r["tpu_estimates"]) == {"v5p-8", "v5p-64", "v5e-8", "v5e-64"}
    for est in r["tpu_estimates"].values():
        for k in ("train_videos_per_s", "sample_videos_per_s", "train_step_s_batch_per_chip_1"):
            assert _positive(est[k]), k
        assert est["mfu"] == model.ASSUMED_MFU


# Tiny shapes for the measured suites: numbers are not checked (no timing asserts), only that every suite runs
# the library's code, shares its compiled step, and reports what the tables and WORKSPACE.md quote.
# One U-Net level (no cross-attention outside the mid block): the library's sharded train step compiles in
# minutes on 2 loaded cores even so, and these tests compile it four times.
TINY = dict(channels=(32,), layers=1, frames=2, hw=8, batch=1, repeats=1, cross_dim=64,
            sample=dict(channels=(32,), layers=1, frames=2, hw=8, batch=1, steps=2, repeats=1),
            scaling=dict(frames=(2,), hw=(8,)), matmul=64)


def _count_calls(monkeypatch, cls, name):
    calls = []
    real = getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_measured_suites_on_tiny_shapes(monkeypatch, capsys):
    steps = _count_calls(monkeypatch, Trainer, "train_step")
    res = cli.run(("train", "memory", "scaling"), suite_sizes=TINY)
    cli.print_tables(res)
    printed = capsys.readouterr().out
    assert "wall seconds per suite" in printed and "remat" in printed and "Trainer.train_step" in printed

    # Every timed step is the library's: the train suite's warm-up + timed step, the memory suite's warm-up +
    # one step of each bench and then one alternated step each; the scaling point reuses the train suite's timing.
    assert len(steps) == 2 + 2 * 2 + 2
    assert set(res["suite_wall_s"]) == {"train", "memory", "scaling"}
    assert res["total_wall_s"] >= sum(res["suite_wall_s"].values()) * 0.99
    for k in ("train_step", "forward"):
        assert _positive(res["train"][k]["ours_s"]) and _positive(res["train"][k]["torch_s"])
    c = res["train"]["config"]
    assert c["params_ours"] > 0 and c["params_trainable_ours"] == c["params_ours"]  # every parameter, as torch
    h = res["train"]["hardware"]
    assert 0 < h["text_encoder_flops"] < h["train_step_flops"]
    r = res["memory"]["remat"]
    assert r["policy"] == "nothing_saveable"
    assert 0 < r["temp_bytes_remat"] < r["temp_bytes_no_remat"]  # the remat step keeps less
    assert r["flops_remat"] > r["flops_no_remat"]  # ... because it recomputes
    assert set(res["memory"]["fsdp"]) == {"1", "2", "4", "8"}
    # The one scaling point is the shared bench's shape: no new compile.
    (point,) = res["scaling"]["points"]
    assert (point["frames"], point["latent"]) == (2, 8) and point["timed_by"] == "train suite"
    assert _positive(point["train_step_s"]) and res["complete"] is True


def test_sample_suite_times_the_sampler(monkeypatch, capsys):
    calls = _count_calls(monkeypatch, Sampler, "sample_latents")
    res = cli.run(("sample",), suite_sizes=TINY)
    cli.print_tables(res)
    assert "Sampler.sample_latents" in capsys.readouterr().out
    s = res["sample"]["sample_ddim"]
    assert len(calls) == 2  # the compiling call + one timed run
    assert _positive(s["ours_s"]) and _positive(s["torch_s"]) and s["ours_recompiles"] == 0
    assert res["sample_ddim"] == s


class FakeBench:
    """Stands in for `common.TrainerBench` in the scaling suite: compiled bytes affine in frames and in latent
    pixels (1 GiB at 8 frames x 16^2), as the real step's; no compiling."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def memory(self):
        return dict(temp_bytes=(self.f // 8) * (self.h * self.h // 256) * 2**30, argument_bytes=0, output_bytes=0)

    def flops(self):
        return 1e9

    def time_train(self, repeats):
        return 0.5


def _fake_benches(monkeypatch):
    compiled = []

    def fake_bench(cache, s, frames=None, hw=None, remat=False):
        compiled.append((frames or s["frames"], hw or s["hw"]))
        return FakeBench(*compiled[-1])

    monkeypatch.setattr(model, "train_bench", fake_bench)
    return compiled


SCALING = dict(channels=(32, 64), layers=1, frames=8, hw=16, batch=1, repeats=2, scaling=dict(frames=(8,), hw=(16,)))


def test_scaling_skips_points_that_do_not_fit_and_keeps_finished_suites(tmp_path, monkeypatch, capsys):
    """A point whose compiled buffers exceed the available memory is reported, not run into the OOM killer;
    the JSON is written after each suite, so a run killed later keeps what it finished."""
    _fake_benches(monkeypatch)
    monkeypatch.setattr(common, "available_bytes", lambda: 2**30)  # the 1 GiB point needs more than 80% of it
    out = tmp_path / "bench.json"
    on_disk = []
    real = outputs.write_json

    def write_and_read_back(path, obj):
        real(path, obj)
        on_disk.append(json.loads(out.read_text()))

    monkeypatch.setattr(outputs, "write_json", write_and_read_back)
    res = cli.run(("scaling",), suite_sizes=SCALING, output=str(out))
    (point,) = res["scaling"]["points"]
    assert "train_step_s" not in point and "GiB available" in point["skipped"] and point["compiled_bytes"] == 2**30
    assert len(on_disk) == 1 and on_disk[0]["complete"] is False and on_disk[0]["scaling"]["points"] == [point]
    cli.print_tables(res)
    assert "skipped: needs 1.0 GiB" in capsys.readouterr().out


def test_extrapolation_is_a_line_through_the_two_largest_smaller_points():
    assert common.extrapolated_bytes([(8, 100)], 32) is None  # one point: no line
    assert common.extrapolated_bytes([(8, 100), (16, 180)], 32) == 340
    # the two largest points below x, whatever their order; points above x are ignored
    assert common.extrapolated_bytes([(16, 180), (2, 5), (8, 100), (64, 10**9)], 32) == 340


def test_scaling_does_not_compile_points_whose_extrapolation_exceeds_memory(monkeypatch, capsys):
    """Memory grows at least linearly along a sweep, so a point whose extrapolated bytes are already too many is
    reported without compiling it (at the default size that saves two ~1-minute compiles)."""
    gib = 2**30
    compiled = _fake_benches(monkeypatch)
    monkeypatch.setattr(common, "available_bytes", lambda: 9.5 * gib)  # 7.6 GiB usable at 0.8 headroom
    sizes = dict(SCALING, scaling=dict(frames=(8, 16, 32, 64), hw=(16, 32, 64)))
    rows = {(p["frames"], p["latent"]): p for p in model.suite_scaling(sizes, {})["points"]}
    # frames 8, 16, 32 need 1, 2, 4 GiB; 64 frames: the line says 8 GiB, over 7.6 usable -> not compiled.
    # latent 32: 4 GiB, compiled; 64: the line says 16 GiB -> not compiled.
    assert compiled == [(8, 16), (16, 16), (32, 16), (8, 32)]
    assert [k for k, p in rows.items() if "train_step_s" in p] == [(8, 16), (16, 16), (32, 16), (8, 32)]
    for key, need in (((64, 16), 8), ((8, 64), 16)):
        assert "compiled_bytes" not in rows[key] and rows[key]["compiled_bytes_at_least"] == need * gib
        assert "needs >= %.1f GiB" % need in rows[key]["skipped"] and "extrapolated" in rows[key]["skipped"]
    res = {"machine": common.machine_info(), "scaling": {"batch": 1, "channels": [32, 64],
                                                         "points": list(rows.values())}}
    cli.print_tables(res)
    assert "needs >= 16.0 GiB" in capsys.readouterr().out


def test_data_and_sampling_loop_suites(capsys):
    res = {"machine": common.machine_info(),
           "data": data.run(batch_size=4, batches=2, num_train=20, skip_real=True),
           "sampling_loop": {"pipeline": [], "toy_models": sampling.run_toy(steps=(2,), samplers=("ddim",),
                                                                            loops=("python",), repeats=1)}}
    cli.print_tables(res)
    printed = capsys.readouterr().out
    assert "moving_shapes 32x32x8, 2 thread(s)" in printed and "toy conv" in printed
    assert [r["shape"] for r in res["data"]["rows"]] == [[4, 8, 32, 32, 3]] * 2
    assert len(res["sampling_loop"]["toy_models"]) == len(sampling.TOY_MODELS)


def test_config_suite_arguments(tmp_path):
    cfg = common.load_config("configs/tiny.py")
    assert int(cfg.num_frames) == 4
    with pytest.raises(FileNotFoundError):
        common.load_config(str(tmp_path / "missing.py"))
    with pytest.raises(app.UsageError):
        cli.main(["--suite=config"])  # --config is required


def test_attention_tpu_kernel_work_model():
    """The splash kernels' work that XLA's cost analysis cannot see: FLOPs by computed blocks, causal half skipped."""
    from benchmarks import attention_tpu as at

    full = at.Case("c", (2, 1024, 5, 64), 1024, False, "train", "")
    causal = at.Case("c", (2, 1024, 5, 64), 1024, True, "train", "")
    flops, extra = at._splash_kernel_work(full, 2)
    assert flops == 9 * (2.0 * 1024 * 1024 * 64) * 2 * 5  # forward 2 + dq 3 + dkv 4 matmuls, all blocks
    assert extra > 0
    assert at._splash_kernel_work(causal, 2)[0] == flops * 3 / 4  # 512-blocks: 3 of the 2x2 blocks are computed
    fwd = at._splash_kernel_work(dataclasses.replace(full, program="forward"), 2)[0]
    assert fwd == flops * 2 / 9


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu on PYTHONPATH (XLA:TPU compiler)")
def test_attention_tpu_suite_compiles_for_v5e():
    from benchmarks import attention_tpu as at

    res = at.run(impls=("xla", "splash"), dtypes=("bfloat16",), cases=("text",), sharded_check=False)
    rows = {r["impl"]: r for r in res["rows"]}
    assert set(rows) == {"xla", "splash"} and all("error" not in r for r in rows.values())
    assert rows["splash"]["kernel_flops"] > 0 and rows["xla"]["auto"] == "xla"


def test_lora_suite_compares_the_two_trainers_on_one_init(monkeypatch, capsys):
    """The lora suite's wiring (the trainers themselves are the library's, tested in test_lora.py): full
    fine-tuning with rank 0, then LoRA of --lora_rank on the same initial weights, and the table."""
    from benchmarks import lora as lora_bench

    seen = []

    class Bench:
        params = {"fake": "weights"}

    def fake_side(config, batch, steps, memory, params=None):
        seen.append((int(config.train.lora.rank), params, batch["video"].shape, steps))
        n = 1000 if config.train.lora.rank == 0 else 100
        side = {"trainable_params": n, "optimizer_bytes": 8 * n, "gradient_bytes": 4 * n, "train_state_bytes": 16 * n,
                "compile_seconds": 1.0, "step_seconds_median": 0.5 if n == 1000 else 0.25, "step_seconds_min": 0.2,
                "final_loss": 1.0}
        return side, Bench()

    monkeypatch.setattr(lora_bench, "_side", fake_side)
    res = cli.run(("lora",), config="configs/tiny.py", steps=3, lora_rank=8)
    assert [(r, p, s) for r, p, _, s in seen] == [(0, None, 3), (8, Bench.params, 3)]
    assert seen[0][2] == (8, 4, 16, 16, 3)  # the config's batch and clip
    r = res["lora"]
    assert r["lora_rank"] == 8 and r["lora_targets"] == ["attention"] and r["ratios"]["trainable_params"] == 0.1
    cli.print_tables(res)
    out = capsys.readouterr().out
    assert "LoRA rank 8 on ['attention'] vs full fine-tuning" in out and "0.5000" in out
