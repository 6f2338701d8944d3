"""Smoke test of `python -m dreamvideo_jax.benchmark`: the `fullsize` suite (abstract shapes only) in-process."""

import json

from dreamvideo_jax import benchmark


def _positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_fullsize_suite_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    benchmark.main(["--suite=fullsize", f"--output={out}"])
    printed = capsys.readouterr().out
    assert "fullsize" in printed and "v5p-8" in printed

    res = json.loads(out.read_text())
    assert set(res) >= {"machine", "fullsize"}
    assert res["machine"]["cores"] >= 1 and res["machine"]["jax"]
    r = res["fullsize"]
    p, f = r["params"], r["flops"]
    # Primary U-Net (~1.4e9 at ms-1.7b size) + retention branch copy of its encoder half.
    assert 1.5e9 < p["total"] < 3e9
    assert 0 < p["trainable"] < p["total"]
    assert p["part_unet"] + p["part_retention"] + p["part_image_conv"] == p["total"]
    for k in ("train_step_per_video", "sampling_step_per_video_3_branches", "sampling_25_ddim_per_video"):
        assert _positive(f[k]), k
    # One sampling step runs the model on 3 branches; a train step is forward + backward of one.
    assert f["sampling_step_per_video_3_branches"] > f["train_step_per_video"] / 3
    assert set(r["tpu_estimates"]) == {"v5p-8", "v5p-64", "v5e-8", "v5e-64"}
    for est in r["tpu_estimates"].values():
        for k in ("train_videos_per_s", "sample_videos_per_s", "train_step_s_batch_per_chip_1"):
            assert _positive(est[k]), k
        assert est["mfu"] == benchmark.ASSUMED_MFU
