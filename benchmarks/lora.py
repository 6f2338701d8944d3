"""The `lora` suite: LoRA fine-tuning against full fine-tuning of the default trainable set, on one config.

  python -m benchmarks --suite=lora [--config=configs/tiny.py] [--steps=10] [--lora_rank=16] [--step_memory]

Two `Trainer`s of the same config, sharded over `config.mesh`, on the same fixed random batch (no data pipeline,
no checkpoints): `full` trains `train.trainable` (default: the primary U-Net's temporal layers, the retention
branch and the image conv block) with AdamW; `lora` freezes everything and trains rank-`lora_rank` adapters
on `train.lora.targets` (default: the primary U-Net's attention projections). Per side: trainable parameters,
optimizer-state bytes (AdamW's moments; what the train state holds besides the params and their EMA), gradient
bytes (one float32 per trainable parameter), the whole train state's bytes, compile time and the median step time
over `--steps` steps after one warm-up. `--step_memory` adds XLA's compiled memory figures of each step (the step
is compiled once more for it).
"""

from __future__ import annotations

import numpy as np

from benchmarks import common
from benchmarks.train_config import random_batch


def _bytes(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
                   if hasattr(x, "shape")))


def _side(config, batch, steps: int, memory: bool, params=None) -> tuple[dict, object]:
    import jax

    jb = common.TrainerBench(config, batch, params=params)
    compile_s = jb.compile()
    times = jb.time_steps(max(1, int(steps)), warmup=1)
    state = jb.tr.abstract_state
    trainable = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    out = {
        "trainable_params": trainable,
        "optimizer_bytes": _bytes(state.opt_state),
        "gradient_bytes": 4 * trainable,
        "train_state_bytes": _bytes(state),
        "compile_seconds": round(compile_s, 3),
        "step_seconds_median": round(float(np.median(times)), 4),
        "step_seconds_min": round(float(min(times)), 4),
        "final_loss": float(np.asarray(jb.metrics["loss"])),
    }
    if memory:
        out["memory"] = jb.memory()
    return out, jb


def run(config, steps: int = 10, rank: int = 16, memory: bool = False) -> dict:
    import jax

    from dreamvideo_jax import lora as lora_lib

    full_cfg = config.copy_and_resolve_references()
    full_cfg.train.lora.rank = 0
    lora_cfg = config.copy_and_resolve_references()
    lora_cfg.train.lora.rank = int(rank)
    b = int(config.train.batch_size) // jax.process_count()
    batch = random_batch(config, b)
    full, jb = _side(full_cfg, batch, steps, memory)
    params = jb.params  # the same initial weights for both sides
    del jb
    low, _ = _side(lora_cfg, batch, steps, memory, params=params)
    spec = lora_lib.spec_from_config(lora_cfg)
    return {
        "backend": jax.default_backend(), "devices": jax.device_count(),
        "batch_size": int(config.train.batch_size),
        "clip": [int(config.num_frames), int(config.height), int(config.width)],
        "lora_rank": spec.rank, "lora_targets": list(spec.targets),
        "full": full, "lora": low,
        "ratios": {k: round(low[k] / full[k], 4) for k in ("trainable_params", "optimizer_bytes", "gradient_bytes",
                                                         "train_state_bytes", "step_seconds_median") if full[k]},
    }


def print_table(r: dict) -> None:
    print(f"\n== lora {r.get('config_file', '')}: batch {r['batch_size']}, clip {r['clip']}, {r['devices']} "
          f"{r['backend']} device(s); LoRA rank {r['lora_rank']} on {r['lora_targets']} vs full fine-tuning of "
          f"train.trainable")
    rows = [("trainable params", "trainable_params", str), ("optimizer bytes", "optimizer_bytes", common.gib),
            ("gradient bytes", "gradient_bytes", common.gib), ("train state bytes", "train_state_bytes", common.gib),
            ("compile s", "compile_seconds", lambda x: f"{x:.1f}"),
            ("step s (median)", "step_seconds_median", lambda x: f"{x:.4f}")]
    print(f"{'':<20}{'full':>16}{'lora':>16}{'lora/full':>11}")
    for label, key, fmt in rows:
        ratio = r["full"][key] and r["lora"][key] / r["full"][key]
        print(f"{label:<20}{fmt(r['full'][key]):>16}{fmt(r['lora'][key]):>16}{ratio:>11.4f}")
    if "memory" in r["full"]:
        for side in ("full", "lora"):
            mem = r[side]["memory"]
            print(f"compiled bytes ({side}): " + ", ".join(f"{k.replace('_bytes', '')} {common.gib(v)}"
                                                           for k, v in mem.items()))
