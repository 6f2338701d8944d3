"""Config sections the trainer reads (`train`, `diffusion`, `mesh`, `sharding`) and config checks.

Top-level keys the trainer reads besides the sections: `seed`, `num_frames`, `height`, `width`, `init_from`,
`resume`. Every key is documented in `train_defaults()` / `diffusion_defaults()`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import ml_collections

MODES = ("dreamvideo", "t2v")

# Default trainable parameters per mode (regexes over '/'-joined parameter paths of the model's params).
DEFAULT_TRAINABLE = {
    # DreamVideo: the primary U-Net's temporal layers, the whole retention branch and the image conv block.
    "dreamvideo": (r"^unet/.*(temp_convs|temp_attentions|transformer_in)", r"^retention/", r"^image_conv/"),
    # Text-to-video base: the whole primary U-Net.
    "t2v": (r"^unet/",),
}

# The path of model.retention.reference_skip's gate (models/dreamvideo.py: DreamVideo.reference_skip, param
# `gate`); not in the defaults above, so a config that turns the skip on names it in train.trainable (checked with
# `re.search`, as training/state.match_trainable selects).
REFERENCE_SKIP_PARAM = "reference_skip/gate"

# Keys under `model` that change numerics or memory but not the parameter tree; they may differ on resume.
RUNTIME_MODEL_KEYS = ("dtype", "remat", "remat_policy")


def train_defaults() -> ml_collections.ConfigDict:
    """The `train` config section (full-size defaults)."""
    return ml_collections.ConfigDict(dict(
        mode="dreamvideo",  # 'dreamvideo' (retention branch + image) or 't2v' (primary U-Net, text only)
        trainable=(),  # regexes over parameter paths (e.g. 'unet/down_blocks_0/.../kernel'); () = mode default
        num_steps=100_000,
        batch_size=8,  # global, over all processes
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
        # Logging.
        log_every=50,  # metrics (JSONL + TensorBoard) every N steps; the loss is checked every step
        progress_bar=True,
    ))


def diffusion_defaults() -> ml_collections.ConfigDict:
    """The `diffusion` section: the training noise schedule (ModelScope-T2V's by default)."""
    return ml_collections.ConfigDict(dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        num_train_timesteps=1000,
        rescale_zero_terminal_snr=False,
    ))


def trainable_patterns(config) -> tuple[str, ...]:
    pats = tuple(config.train.trainable)
    return pats if pats else DEFAULT_TRAINABLE[config.train.mode]


def check_config(config) -> None:
    """Cheap checks with readable errors, before anything is built."""
    t = config.train
    if t.mode not in MODES:
        raise ValueError(f"train.mode={t.mode!r}; use one of {MODES}")
    if int(t.num_steps) < 0:
        raise ValueError(f"train.num_steps={t.num_steps} must be >= 0")
    if int(t.batch_size) < 1:
        raise ValueError(f"train.batch_size={t.batch_size} must be >= 1")
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
    if "diffusion" in config:
        num_t = int(config.diffusion.num_train_timesteps)
        if not 0 <= int(t.timestep_high_start) < num_t:
            raise ValueError(f"train.timestep_high_start={t.timestep_high_start} must be in [0, {num_t}) "
                             "(diffusion.num_train_timesteps)")
    if not 0.0 <= float(t.ema_decay) < 1.0:
        raise ValueError(f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    if "model" in config and config.model.retention.get("reference_skip", False):
        if t.prediction_type != "x0":
            raise ValueError(f"model.retention.reference_skip=True adds the reference latent to an x0 prediction: "
                             f"it needs train.prediction_type='x0', got {t.prediction_type!r}")
        if t.mode == "dreamvideo" and not any(re.search(p, REFERENCE_SKIP_PARAM) for p in trainable_patterns(config)):
            raise ValueError(f"model.retention.reference_skip=True, but no train.trainable pattern matches its gate "
                             f"{REFERENCE_SKIP_PARAM!r}: it would stay zero (add r'^{REFERENCE_SKIP_PARAM.split('/')[0]}/')")
    if "data" in config:
        d = config.data
        for key in ("num_frames", "height", "width"):
            if key in d and key in config and int(d[key]) != int(config[key]):
                raise ValueError(f"data.{key}={d[key]} differs from {key}={config[key]} (the model's clip size)")


def to_dict(config) -> dict:
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)


def to_json(config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True, default=_json_default)


def _json_default(x):
    if isinstance(x, tuple):
        return list(x)
    try:
        return x.item()
    except AttributeError:
        return str(x)


def _norm(x):
    """JSON round-trip normal form (tuples become lists)."""
    return json.loads(json.dumps(x, default=_json_default))


def architecture(config) -> dict:
    """The part of a config that fixes the trainable/frozen parameter trees and the optimizer state layout."""
    d = _norm(to_dict(config))
    model = {k: v for k, v in d.get("model", {}).items() if k not in RUNTIME_MODEL_KEYS}
    text = model.get("text")
    if text:  # only the layers that run are built: 24 layers with output_layer 23 == 23 layers
        layers = text.get("output_layer") or text.get("num_layers")
        model["text"] = {**text, "num_layers": layers, "output_layer": layers}
    if "retention" in model:  # a sampling-time knob, not a parameter shape
        model["retention"] = {k: v for k, v in model["retention"].items() if k != "conditioning_scale"}
        if not model["retention"].get("reference_skip", False):  # off == absent (checkpoints from before the key)
            model["retention"].pop("reference_skip", None)
    train = d.get("train", {})
    mode = train.get("mode", "dreamvideo")
    pats = list(train.get("trainable") or DEFAULT_TRAINABLE[mode])
    return {"model": model, "train": {"mode": mode, "trainable": pats}}


def architecture_hash(config) -> str:
    return hashlib.sha256(json.dumps(architecture(config), sort_keys=True).encode()).hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def diff(a: dict, b: dict) -> list[str]:
    """'key: a -> b' lines for keys whose values differ between two (nested) dicts."""
    fa, fb = _flat(_norm(a)), _flat(_norm(b))
    out = []
    for k in sorted(set(fa) | set(fb)):
        va, vb = fa.get(k, "<absent>"), fb.get(k, "<absent>")
        if va != vb:
            out.append(f"{k}: {va!r} -> {vb!r}")
    return out


def architecture_diff(stored: dict, current) -> list[str]:
    return diff(architecture(stored), architecture(current))
