"""Model components for training, trainable/frozen split, optimizer and the train state.

Parameter trees used by the trainer:
  * all params: `{'model': {'unet', 'retention', 'image_conv'} | {'unet'}, 'text_encoder': ..., 'vae': ...}`
    ('vae' is empty for the parameter-free patch autoencoder);
  * trainable: the leaves of `all['model']` whose '/'-joined path matches a `train.trainable` regex,
    as a nested dict with the same paths (e.g. `{'unet': {'down_blocks_0': {'temp_convs_0': ...}}}`);
  * frozen: everything else, `{'model': <rest of the model>, 'text_encoder': ..., 'vae': ...}`.
Only trainable leaves enter the optimizer state and the EMA.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from dreamvideo_jax.diffusion import schedules
from dreamvideo_jax.models import build as mb
from dreamvideo_jax.models.retention import init_retention_from_unet
from dreamvideo_jax.parallel import sharding as sh
from dreamvideo_jax.training import config as tc

SEP = "/"


def flatten(tree: dict) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep=SEP) if tree else {}


def unflatten(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep=SEP) if flat else {}


def match_trainable(model_params: dict, patterns: tuple[str, ...]) -> frozenset[str]:
    """Paths of the model's params matched by any regex (`re.search`); every regex must match something."""
    paths = list(flatten(model_params))
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"train.trainable: {p!r} is not a valid regex ({e})") from None
    unused = [p.pattern for p in compiled if not any(p.search(k) for k in paths)]
    if unused:
        roots = sorted({k.split(SEP)[0] for k in paths})
        raise ValueError(f"train.trainable: {unused} match no parameter (paths look like {paths[0]!r}; "
                         f"top-level groups {roots})")
    out = frozenset(k for k in paths if any(p.search(k) for p in compiled))
    if not out:
        raise ValueError(f"train.trainable: {list(patterns)} select no parameter")
    return out


def split_model(model_params: dict, trainable_paths: frozenset[str]) -> tuple[dict, dict]:
    flat = flatten(model_params)
    train = {k: v for k, v in flat.items() if k in trainable_paths}
    frozen = {k: v for k, v in flat.items() if k not in trainable_paths}
    return unflatten(train), unflatten(frozen)


def merge_model(trainable: dict, frozen_model: dict) -> dict:
    flat = flatten(frozen_model)
    flat.update(flatten(trainable))
    return unflatten(flat)


@dataclasses.dataclass
class Components:
    """Modules and abstract parameter trees of a config; nothing is allocated."""

    config: Any
    mode: str
    model: nn.Module
    text_encoder: nn.Module
    vae: nn.Module
    schedule: schedules.NoiseSchedule
    abstract: dict  # boxed abstract params {'model', 'text_encoder', 'vae'}
    trainable_paths: frozenset[str]

    @property
    def m(self):
        return self.config.model

    def null_tokens(self) -> np.ndarray:
        """Token ids of the empty prompt "": <|startoftext|> <|endoftext|> then padding, shape (1, L)."""
        length = mb.text_config(self.m).context_length
        pad = int(self.config.data.get("pad_id", 49407)) if "data" in self.config else 49407
        ids = np.full((1, length), pad, np.int32)
        ids[0, 0], ids[0, 1] = 49406, 49407
        return ids

    def abstract_split(self) -> tuple[dict, dict]:
        """(trainable, frozen) boxed abstract trees."""
        train, frozen_model = split_model(self.abstract["model"], self.trainable_paths)
        return train, {"model": frozen_model, "text_encoder": self.abstract["text_encoder"],
                       "vae": self.abstract["vae"]}

    def init_all(self, key: jax.Array) -> dict:
        """Random init of every parameter (boxed), the retention branch copying the primary U-Net."""
        k_model, k_text, k_vae = jax.random.split(key, 3)
        inputs = mb.dummy_inputs(self.m)
        if self.mode == "t2v":
            model = self.model.init(k_model, inputs["latents"], inputs["timesteps"], inputs["context"],
                                    method="unet_only")["params"]
        else:
            model = self.model.init(k_model, **inputs)["params"]
            unboxed = init_retention_from_unet(sh.unbox(model))
            model = jax.tree.map(lambda box, v: box.replace_boxed(v) if sh.is_boxed(box) else v,
                                 model, unboxed, is_leaf=sh.is_boxed)
        ids = jnp.zeros((1, mb.text_config(self.m).context_length), jnp.int32)
        text = self.text_encoder.init(k_text, ids).get("params", {})
        f = mb.autoencoder_factor(self.m)
        vae = self.vae.init(k_vae, jnp.zeros((1, 2 * f, 2 * f, 3), jnp.float32)).get("params", {})
        return {"model": model, "text_encoder": text, "vae": vae}


def build_components(config) -> Components:
    tc.check_config(config)
    m = config.model
    model = mb.build_dreamvideo(m)
    comps = Components(
        config=config,
        mode=config.train.mode,
        model=model,
        text_encoder=mb.build_text_encoder(m),
        vae=mb.build_autoencoder(m),
        schedule=make_noise_schedule(config),
        abstract={},
        trainable_paths=frozenset(),
    )
    comps.abstract = jax.eval_shape(comps.init_all, jax.random.key(0))
    comps.trainable_paths = match_trainable(comps.abstract["model"], tc.trainable_patterns(config))
    return comps


def make_noise_schedule(config) -> schedules.NoiseSchedule:
    d = config.diffusion if "diffusion" in config else tc.diffusion_defaults()
    return schedules.make_schedule(
        d.beta_schedule,
        int(d.num_train_timesteps),
        float(d.beta_start),
        float(d.beta_end),
        bool(d.get("rescale_zero_terminal_snr", False)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Optimizer


def make_lr_schedule(t) -> optax.Schedule:
    lr, warm, total = float(t.learning_rate), int(t.warmup_steps), int(t.num_steps)
    decay_steps = max(1, total - warm)
    if t.lr_schedule == "constant":
        after = optax.constant_schedule(lr)
    elif t.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(t.min_lr_ratio))
    else:
        after = optax.linear_schedule(lr, lr * float(t.min_lr_ratio), decay_steps)
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def _decay_mask(params):
    return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = make_lr_schedule(t)
    parts = []
    if float(t.grad_clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(t.grad_clip_norm)))
    parts.append(optax.adamw(lr, b1=float(t.adam_b1), b2=float(t.adam_b2), eps=float(t.adam_eps),
                             weight_decay=float(t.weight_decay), mask=_decay_mask))
    return optax.chain(*parts), lr


# ----------------------------------------------------------------------------------------------------------------
# Train state


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # trainable params only
    opt_state: Any
    ema: Any  # EMA of `params`
    rng: jax.Array  # uint32 key data of the base key; step keys are fold_in(key, step)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    key = jax.random.key(seed)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, params),
        rng=jax.random.key_data(jax.random.fold_in(key, 0x7A1)),
    )


def state_shardings(abstract_state: TrainState, param_shardings: Any, tx, mesh) -> TrainState:
    """Shardings of a TrainState: param-shaped optimizer leaves follow the params, the rest is replicated."""
    rep = sh.replicated(mesh)
    opt = optax.tree_map_params(
        tx, lambda _, s: s, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: rep,
    )
    return TrainState(step=rep, params=param_shardings, opt_state=opt, ema=param_shardings, rng=rep)
