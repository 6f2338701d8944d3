"""The training step: frozen encoders, noising, condition dropout, loss, grads for the trainable subset, AdamW, EMA.

`make_train_step(system, tx, lr_fn)` returns a pure function `(state, frozen, batch) -> (state, metrics)`; the
loop jits it with explicit shardings and donates `state`. Randomness of step `s` is `fold_in(key, s)`, so a
resumed run draws exactly the noise, timesteps and dropout masks the uninterrupted run would have drawn.

Batches are dicts with a leading batch axis:
  * `video` float32 (B, F, H, W, 3) in [-1, 1] (or uint8 in [0, 255], `data.as_uint8`, normalised here)
    -- or precomputed `latents` (B, F, h, w, C) (scaled);
  * `tokens` int32 (B, L)                        -- or precomputed `context` (B, L, D);
  * `image` (B, H, W, 3) in [-1, 1], the reference image (default: the first frame of `video`);
    with `model.retention.image_input == 'latent'` an `image_latent` (B, h, w, C) may be given instead.
Other keys (e.g. `index`) are ignored.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from dreamvideo_jax.diffusion import objective, schedules
from dreamvideo_jax.models.vae import encode_video
from dreamvideo_jax.system import System
from dreamvideo_jax.training import config as train_config
from dreamvideo_jax.training.state import TrainState

_LAST_FRAME_SALT = 0x1A57  # the draw of train.condition_modes: folded into the dropout key, so the other draws
# of a step are the same with or without it
MODEL_INPUT_KEYS = ("video", "latents", "tokens", "context", "image", "image_latent")


def model_inputs(batch: dict) -> dict:
    """The keys of a data batch the step uses (others, such as provenance indices, never reach the device)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def _to_unit_range(x: jax.Array) -> jax.Array:
    """uint8 pixels in [0, 255] (`data.as_uint8`: 4x less host memory and transfer) -> float32 in [-1, 1] on the
    device; float pixels pass unchanged."""
    return x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x


def make_loss_fn(system: System) -> Callable:
    """`(trainable, frozen, batch, key) -> (loss, aux)`; `trainable` and `frozen` are `system.split` halves (with
    LoRA: the adapter tree and the whole layout, combined by `system.combine`)."""
    t = system.config.train
    mode, schedule = system.mode, system.schedule
    prediction_type = system.prediction_type
    num_t = schedule.num_train_timesteps
    p_drop = float(t.condition_dropout)
    image_input = system.image_input
    null_tokens = system.null_tokens()
    high_fraction, high_start = float(t.timestep_high_fraction), int(t.timestep_high_start)
    p_last = train_config.last_frame_probability(system.config) if system.last_frame else 0.0

    def loss_fn(trainable, frozen, batch, key):
        batch = {k: _to_unit_range(v) if k in ("video", "image") else v for k, v in batch.items()}
        k_vae, k_t, k_noise, k_drop, k_dropout = jax.random.split(key, 5)
        if "latents" in batch:
            x0 = batch["latents"].astype(jnp.float32)
        else:
            vae = system.vae_variables(frozen)
            x0 = encode_video(system.autoencoder, vae, batch["video"], k_vae if t.vae_sample else None)
            x0 = jax.lax.stop_gradient(x0.astype(jnp.float32))
        context = batch["context"] if "context" in batch else system.encode_text(frozen, batch["tokens"])
        context = jax.lax.stop_gradient(context)
        null_context = jax.lax.stop_gradient(system.encode_text(frozen, jnp.asarray(null_tokens)))
        b = x0.shape[0]
        timesteps = objective.sample_timesteps(k_t, b, num_t, high_fraction, high_start)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        x_t = schedules.add_noise(schedule, x0, noise, timesteps)
        target = schedules.training_target(schedule, x0, noise, timesteps, prediction_type)

        if mode == "t2v":
            dummy = jnp.zeros((b, 1), jnp.float32)
            context, _, masks = objective.condition_dropout(k_drop, context, null_context, dummy, p_drop)
            pred = system.predict(system.combine(trainable, frozen), x_t, timesteps, context, train=True,
                                  rngs={"dropout": k_dropout})
            image_dropped = jnp.zeros((b,), bool)
        else:
            if image_input == "latent":
                if "image_latent" in batch:
                    image = batch["image_latent"]
                elif "image" in batch:
                    image = system.image_latent(frozen, batch["image"])
                else:
                    image = x0[:, 0]
            else:
                image = batch["image"] if "image" in batch else batch["video"][:, 0]
            image = jax.lax.stop_gradient(image.astype(jnp.float32))
            if system.last_frame:  # first+last-frame mode for a share of the clips (train.condition_modes)
                if image_input == "latent":
                    last = system.image_latent(frozen, batch["video"][:, -1]) if "video" in batch else x0[:, -1]
                elif "video" in batch:
                    last = batch["video"][:, -1]
                else:
                    raise ValueError("model.retention.last_frame with image_input='pixels' needs the clips' "
                                     "frames (batch key 'video'), not only their latents")
                last_given = objective.sample_last_frame_given(jax.random.fold_in(k_drop, _LAST_FRAME_SALT), b,
                                                               p_last)
                image = system.model_image(image, jax.lax.stop_gradient(last.astype(jnp.float32)), last_given)
            context, image, masks = objective.condition_dropout(k_drop, context, null_context, image, p_drop)
            image_dropped = masks.image_dropped
            pred = system.predict(system.combine(trainable, frozen), x_t, timesteps, context, image, train=True,
                                  rngs={"dropout": k_dropout})
        out = objective.diffusion_loss(pred, target, timesteps, schedule=schedule, prediction_type=prediction_type,
                                       loss_weighting=t.loss_weighting, snr_gamma=float(t.snr_gamma))
        aux = dict(timesteps=timesteps, per_sample_mse=out.per_sample_mse,
                   text_dropped=masks.text_dropped, image_dropped=image_dropped)
        return out.loss, aux

    return loss_fn


def make_eval_step(system: System) -> Callable:
    """`(trainable, frozen, batch, mask, key) -> {'loss_sum', 'count'}`: the training loss's per-sample MSE
    (unweighted) summed over the real rows (`mask`) of an evaluation batch; pure, to be jitted by the caller.
    The same loss as training (noise, timesteps and condition dropout drawn from `key`), so a fixed key per
    batch gives an evaluation curve whose points differ only by the weights."""
    loss_fn = make_loss_fn(system)

    def eval_step(trainable, frozen, batch, mask, key):
        _, aux = loss_fn(trainable, frozen, batch, key)
        m = mask.astype(jnp.float32)
        return {"loss_sum": jnp.sum(aux["per_sample_mse"] * m), "count": jnp.sum(m)}

    return eval_step


def make_train_step(system: System, tx: optax.GradientTransformation, lr_fn: optax.Schedule) -> Callable:
    """`(state, frozen, batch) -> (new_state, metrics)`; pure, to be jitted by the caller."""
    t = system.config.train
    loss_fn = make_loss_fn(system)
    ema_decay, ema_warmup = float(t.ema_decay), bool(t.ema_warmup)
    skip_nonfinite = t.nonfinite == "skip"
    n_buckets = int(t.timestep_buckets)
    num_t = system.schedule.num_train_timesteps

    def train_step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict[str, Any]]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if ema_decay > 0:
            decay = jnp.asarray(ema_decay, jnp.float32)
            if ema_warmup:
                s = state.step.astype(jnp.float32)
                decay = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
            ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), state.ema, params)
        else:
            ema = params
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state, ema = keep(params, state.params), keep(opt_state, state.opt_state), keep(ema, state.ema)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        sums, counts = objective.timestep_buckets(aux["timesteps"], aux["per_sample_mse"], n_buckets, num_t)
        metrics = dict(
            loss=loss,
            grad_norm=grad_norm,
            param_norm=optax.global_norm(params),
            update_norm=optax.global_norm(updates),
            learning_rate=lr_fn(state.step),
            finite=finite,
            text_dropped=jnp.mean(aux["text_dropped"].astype(jnp.float32)),
            image_dropped=jnp.mean(aux["image_dropped"].astype(jnp.float32)),
            bucket_loss_sum=sums,
            bucket_count=counts,
        )
        return new_state, metrics

    return train_step
