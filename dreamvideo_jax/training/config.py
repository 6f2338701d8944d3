"""The `train` config section and the checks of a training config.

Top-level keys the trainer reads besides the sections: `seed`, `num_frames`, `height`, `width`, `init_from`,
`resume`. The `diffusion` section belongs to `diffusion.schedules` (`DEFAULTS`), the trainable sets and the
architecture to `dreamvideo_jax.system`.
"""

from __future__ import annotations

import re

import ml_collections

from dreamvideo_jax import lora as lora_lib
from dreamvideo_jax import system as system_lib
from dreamvideo_jax.diffusion import schedules


def train_defaults() -> ml_collections.ConfigDict:
    """The `train` config section (full-size defaults)."""
    return ml_collections.ConfigDict(dict(
        mode="dreamvideo",  # 'dreamvideo' (retention branch + image) or 't2v' (primary U-Net, text only)
        trainable=(),  # regexes over parameter paths (e.g. 'unet/down_blocks_0/.../kernel'); () = mode default
        # Low-rank adapters instead of `trainable` when lora.rank > 0 (dreamvideo_jax/lora): rank, alpha
        # (0 = rank), targets (regexes or presets 'attention' | 'temporal' | 'branch'; () = ('attention',)).
        lora=lora_lib.defaults(),
        num_steps=100_000,
        batch_size=8,  # global, over all processes
        # > 0: the global batch is this many clips per data-parallel device (the mesh's data x fsdp), which
        # replaces batch_size when the trainer is built (config.json records both); 0 = use batch_size.
        per_device_batch_size=0,
        # Optimizer: AdamW with linear warmup then `lr_schedule`, global-norm clipping.
        learning_rate=5e-5,
        lr_schedule="cosine",  # 'cosine' | 'linear' | 'constant' (after warmup)
        warmup_steps=500,
        min_lr_ratio=0.0,  # final lr = learning_rate * min_lr_ratio ('cosine' / 'linear')
        adam_b1=0.9,
        adam_b2=0.999,
        adam_eps=1e-8,
        weight_decay=0.01,  # decoupled, applied to kernels / embeddings only (not biases or norms)
        grad_clip_norm=1.0,  # 0 = no clipping
        ema_decay=0.9999,  # EMA of the trainable params; 0 = EMA equals the params
        ema_warmup=False,  # decay min(ema_decay, (1 + step) / (10 + step)) early on (diffusers' use_ema_warmup)
        # Objective.
        prediction_type="eps",  # 'eps' | 'v' | 'x0'
        loss_weighting="none",  # 'none' | 'min_snr_gamma'
        snr_gamma=5.0,
        # Timesteps: uniform over [0, T), except that a share `timestep_high_fraction` of the samples draws from
        # [timestep_high_start, T) (0 = plain uniform, as ModelScope / DreamVideo train).
        timestep_high_fraction=0.0,
        timestep_high_start=900,
        condition_dropout=0.05,  # p of each case: text only / both / image only dropped (t2v: text dropped w.p. 2p)
        # Keyframes a training clip is conditioned on, relative weights: 'first' (the reference image) or
        # 'first_last' (also the clip's last frame; needs model.retention.last_frame).
        condition_modes=ml_collections.ConfigDict(dict(first=1.0, first_last=0.0)),
        vae_sample=True,  # encode frames by sampling the VAE posterior (False: its mean)
        timestep_buckets=10,  # loss is also logged per timestep bucket
        nonfinite="stop",  # non-finite loss or gradients: 'stop' (error naming the step) | 'skip' (drop the update)
        # Checkpoints.
        checkpoint_every=1000,
        keep_checkpoints=3,  # newest N kept
        keep_every=0,  # additionally keep every checkpoint whose step is a multiple of this (0 = none)
        async_checkpointing=True,
        corrupt_checkpoint="error",  # unreadable latest checkpoint: 'error' | 'fallback' (to the previous one)
        init_from_ema=True,  # init_from a training workdir: take its EMA params (else its raw params)
        # Evaluation: the training loss (unweighted MSE, EMA weights) on the first eval_batches batches of
        # data.eval_split, with the same noise each time, every eval_every steps and at the last step.
        eval_every=0,  # 0 = no evaluation
        eval_batches=8,
        # Logging.
        log_every=50,  # metrics (JSONL + TensorBoard) every N steps; the loss is checked every step
        progress_bar=True,
    ))


def check_config(config) -> None:
    """Cheap checks with readable errors, before anything is built."""
    t = config.train
    if t.mode not in system_lib.MODES:
        raise ValueError(f"train.mode={t.mode!r}; use one of {system_lib.MODES}")
    if int(t.num_steps) < 0:
        raise ValueError(f"train.num_steps={t.num_steps} must be >= 0")
    if int(t.batch_size) < 1:
        raise ValueError(f"train.batch_size={t.batch_size} must be >= 1")
    if int(t.get("per_device_batch_size", 0)) < 0:
        raise ValueError(f"train.per_device_batch_size={t.per_device_batch_size} must be >= 0 (0 = use "
                         "train.batch_size)")
    if int(t.get("eval_every", 0)) < 0 or int(t.get("eval_batches", 1)) < 1:
        raise ValueError(f"train.eval_every={t.get('eval_every')} must be >= 0 and train.eval_batches="
                         f"{t.get('eval_batches')} >= 1")
    if int(t.checkpoint_every) < 1:
        raise ValueError(f"train.checkpoint_every={t.checkpoint_every} must be >= 1")
    if t.lr_schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"train.lr_schedule={t.lr_schedule!r}; use 'cosine', 'linear' or 'constant'")
    if t.nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.nonfinite={t.nonfinite!r}; use 'stop' or 'skip'")
    if t.corrupt_checkpoint not in ("error", "fallback"):
        raise ValueError(f"train.corrupt_checkpoint={t.corrupt_checkpoint!r}; use 'error' or 'fallback'")
    if not 0.0 <= float(t.condition_dropout) <= 1.0 / 3.0:
        raise ValueError(f"train.condition_dropout={t.condition_dropout} must be in [0, 1/3]")
    if not 0.0 <= float(t.timestep_high_fraction) <= 1.0:
        raise ValueError(f"train.timestep_high_fraction={t.timestep_high_fraction} must be in [0, 1]")
    last_frame_probability(config)
    unknown = sorted(set(t) - set(train_defaults()))
    if unknown:
        raise ValueError(f"train: unknown config keys {unknown}; known keys are {sorted(train_defaults())}")
    if t.get("lora") is not None:
        lora_lib.check_config(t.lora)
    if "diffusion" in config:
        num_t = int(schedules.section(config.diffusion)["num_train_timesteps"])
        if not 0 <= int(t.timestep_high_start) < num_t:
            raise ValueError(f"train.timestep_high_start={t.timestep_high_start} must be in [0, {num_t}) "
                             "(diffusion.num_train_timesteps)")
    if not 0.0 <= float(t.ema_decay) < 1.0:
        raise ValueError(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    if "model" in config and config.model.retention.get("reference_skip", False):
        if t.prediction_type != "x0":
            raise ValueError(f"model.retention.reference_skip=True adds the reference latent to an x0 prediction: "
                             f"it needs train.prediction_type='x0', got {t.prediction_type!r}")
        gate = system_lib.REFERENCE_SKIP_PARAM
        if t.mode == "dreamvideo" and not any(re.search(p, gate) for p in system_lib.trainable_patterns(config)):
            raise ValueError(f"model.retention.reference_skip=True, but no train.trainable pattern matches its gate "
                             f"{gate!r}: it would stay zero (add r'^{gate.split('/')[0]}/')")
    if last_frame_probability(config) > 0 and t.mode == "dreamvideo":
        probe = system_lib.LAST_FRAME_GROUP + "/conv_out/kernel"
        if not any(re.search(p, probe) for p in system_lib.trainable_patterns(config)):
            raise ValueError(f"train.condition_modes.first_last > 0, but no train.trainable pattern matches the "
                             f"last-frame encoder {probe!r}: it would stay zero (add "
                             f"r'{system_lib.LAST_FRAME_TRAINABLE}')")
    if "data" in config:
        d = config.data
        for key in ("num_frames", "height", "width"):
            if key in d and key in config and int(d[key]) != int(config[key]):
                raise ValueError(f"data.{key}={d[key]} differs from {key}={config[key]} (the model's clip size)")


CONDITION_MODES = ("first", "first_last")


def last_frame_probability(config) -> float:
    """The share of training clips conditioned on their last frame too (`train.condition_modes`, normalised).

    Raises:
        ValueError: an unknown mode, a negative weight, all weights zero, or 'first_last' without
            `model.retention.last_frame`.
    """
    modes = config.train.get("condition_modes")
    if modes is None:
        return 0.0
    modes = dict(modes)
    unknown = sorted(set(modes) - set(CONDITION_MODES))
    if unknown:
        raise ValueError(f"train.condition_modes: unknown modes {unknown}; known modes are {list(CONDITION_MODES)}")
    weights = {k: float(modes.get(k, 0.0)) for k in CONDITION_MODES}
    for k, v in weights.items():
        if not v >= 0.0:
            raise ValueError(f"train.condition_modes.{k}={modes[k]} must be >= 0 (a relative weight)")
    total = sum(weights.values())
    if total <= 0.0:
        raise ValueError(f"train.condition_modes: all weights are 0 ({weights}); give at least one > 0")
    p = weights["first_last"] / total
    if p > 0:
        model = config.get("model")
        if model is None or not model.retention.get("last_frame", False):
            raise ValueError(f"train.condition_modes.first_last={modes['first_last']} conditions clips on their "
                             "last frame: it needs model.retention.last_frame=True")
        if config.train.mode != "dreamvideo":
            raise ValueError("train.condition_modes.first_last > 0 needs train.mode='dreamvideo' (the retention "
                             "branch takes the keyframes)")
    return p


def resolve_batch_size(config, divisor: int) -> int:
    """The global batch for a mesh whose batch axes split it `divisor` ways: `train.per_device_batch_size *
    divisor` when that is set (> 0; written into `train.batch_size`), else `train.batch_size`."""
    t = config.train
    per_device = int(t.get("per_device_batch_size", 0))
    if per_device > 0:
        t.batch_size = per_device * divisor
    return int(t.batch_size)
