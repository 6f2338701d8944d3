"""Training objective: timestep sampling, condition dropout, weighted loss and per-timestep loss buckets.

All functions are pure and shape-static, so they can live inside a jitted ``train_step``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from dreamvideo_jax.diffusion.schedules import NoiseSchedule, canonical_prediction_type, snr

LossWeighting = Literal["none", "min_snr_gamma"]


def sample_timesteps(
    key: jax.Array,
    batch: int,
    num_train_timesteps: int = 1000,
    high_fraction: float = 0.0,
    high_start: int = 0,
) -> jax.Array:
    """Draws one training timestep per sample as int32: uniform over ``[0, num_train_timesteps)``, except that
    with probability ``high_fraction`` a sample draws uniformly from the high-noise range
    ``[high_start, num_train_timesteps)`` instead.

    ``high_fraction=0`` (the default) is plain uniform sampling, what ModelScope and DreamVideo train with.
    A high-noise share puts more of the training signal where ``x_t`` no longer shows the clip's content, the
    only noise levels at which an image-to-video model must take the motion from the text (WORKSPACE.md, Demo).
    """
    if not 0.0 <= high_fraction <= 1.0:
        raise ValueError(f"high_fraction={high_fraction} must be in [0, 1]")
    if not 0 <= high_start < num_train_timesteps:
        raise ValueError(f"high_start={high_start} must be in [0, {num_train_timesteps})")
    t = jax.random.randint(key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
    if high_fraction == 0.0:
        return t
    k_high, k_pick = jax.random.split(jax.random.fold_in(key, 1))
    t_high = jax.random.randint(k_high, (batch,), high_start, num_train_timesteps, dtype=jnp.int32)
    return jnp.where(jax.random.uniform(k_pick, (batch,)) < high_fraction, t_high, t)


class DropoutMasks(NamedTuple):
    """Which conditions :func:`condition_dropout` removed, per sample (bool ``(B,)``)."""

    text_dropped: jax.Array
    image_dropped: jax.Array


def condition_dropout(
    key: jax.Array,
    text_emb: jax.Array,
    null_text_emb: jax.Array,
    image: jax.Array,
    p: float | jax.Array,
) -> tuple[jax.Array, jax.Array, DropoutMasks]:
    """Drops text and/or image conditions per sample, as InstructPix2Pix trains for double guidance.

    One uniform ``r`` per sample: text is replaced by the null-text embedding if ``r < 2p``; the image is
    zeroed if ``p <= r < 3p``. So with probability ``p`` each a sample loses only its text, both, or only its
    image. The model thereby learns the three conditionals that double-condition guidance evaluates at
    sampling time: ``(empty, empty)``, ``(image, empty)`` and ``(image, text)``.

    Args:
        key: PRNG key.
        text_emb: text encoder outputs ``(B, L, D)``.
        null_text_emb: the encoding of the empty prompt ``""``, ``(L, D)`` or ``(1, L, D)``. Using the real
            encoding (not zeros) matters: sampling uses it as the unconditional input.
        image: the reference-image input of the image branch ``(B, ...)``; dropped means all zeros.
        p: per-case probability (IP2P and DreamVideo use 0.05); may be a traced scalar.

    Returns:
        ``(text_emb, image, masks)`` with the same shapes and dtypes as the inputs.
    """
    batch = text_emb.shape[0]
    r = jax.random.uniform(key, (batch,), dtype=jnp.float32)
    p = jnp.asarray(p, jnp.float32)
    text_dropped = r < 2.0 * p
    image_dropped = (r >= p) & (r < 3.0 * p)
    null = jnp.broadcast_to(jnp.asarray(null_text_emb, text_emb.dtype).reshape(text_emb.shape[1:]), text_emb.shape)
    text_out = jnp.where(text_dropped[:, None, None], null, text_emb)
    image_mask = image_dropped.reshape((batch,) + (1,) * (image.ndim - 1))
    image_out = jnp.where(image_mask, jnp.zeros_like(image), image)
    return text_out, image_out, DropoutMasks(text_dropped, image_dropped)


def sample_last_frame_given(key: jax.Array, batch: int, p: float | jax.Array) -> jax.Array:
    """Which samples are conditioned on their last frame too (first+last-frame mode), bool ``(B,)``: each
    independently with probability ``p`` (``train.condition_modes``)."""
    return jax.random.uniform(key, (batch,), dtype=jnp.float32) < jnp.asarray(p, jnp.float32)


class DiffusionLoss(NamedTuple):
    """Output of :func:`diffusion_loss`.

    Attributes:
        loss: scalar to minimise, ``mean(weights * per_sample_mse)``.
        per_sample_loss: ``weights * per_sample_mse``, ``(B,)``.
        per_sample_mse: unweighted mean squared error per sample, ``(B,)``; comparable across timesteps
            and weightings, so it is what to bucket by timestep for monitoring.
        weights: the per-sample loss weights ``(B,)`` (all ones for ``'none'``).
    """

    loss: jax.Array
    per_sample_loss: jax.Array
    per_sample_mse: jax.Array
    weights: jax.Array


def loss_weights(
    schedule: NoiseSchedule,
    timesteps: jax.Array,
    prediction_type: str,
    loss_weighting: LossWeighting = "none",
    snr_gamma: float = 5.0,
) -> jax.Array:
    """Per-sample loss weights, float32 ``(B,)``.

    ``'min_snr_gamma'`` (Hang et al., 2023) weights the *x0-space* error by ``min(SNR, gamma)``; expressed
    for the network's target this is ``min(SNR, gamma) / SNR`` for eps, ``min(SNR, gamma) / (SNR + 1)`` for
    v and ``min(SNR, gamma)`` for x0 -- the same as diffusers' training examples. The eps form is written
    as ``min(1, gamma / SNR)`` so it stays finite at zero SNR.
    """
    if loss_weighting == "none":
        return jnp.ones(timesteps.shape, jnp.float32)
    if loss_weighting != "min_snr_gamma":
        raise ValueError(f"Unknown loss_weighting {loss_weighting!r}; expected 'none' or 'min_snr_gamma'.")
    prediction_type = canonical_prediction_type(prediction_type)
    s = snr(schedule, timesteps)
    gamma = jnp.asarray(snr_gamma, jnp.float32)
    if prediction_type == "eps":
        return jnp.minimum(1.0, gamma / s)
    clipped = jnp.minimum(s, gamma)
    if prediction_type == "v":
        return clipped / (s + 1.0)
    return clipped


def diffusion_loss(
    prediction: jax.Array,
    target: jax.Array,
    timesteps: jax.Array,
    *,
    schedule: NoiseSchedule | None = None,
    prediction_type: str = "eps",
    loss_weighting: LossWeighting = "none",
    snr_gamma: float = 5.0,
) -> DiffusionLoss:
    """Mean squared error between network output and target, optionally SNR-weighted.

    Computed in float32 whatever the prediction dtype, so a bf16 model does not lose the loss's precision.

    Args:
        prediction: network output ``(B, ...)``.
        target: :func:`~dreamvideo_jax.diffusion.schedules.training_target` for the same batch.
        timesteps: the integer timesteps ``(B,)`` the batch was noised at.
        schedule: required for ``'min_snr_gamma'`` (it needs the SNR of each timestep).
        prediction_type: the network's target type; used by ``'min_snr_gamma'``.
        loss_weighting: ``'none'`` (plain MSE, what ModelScope trained with) or ``'min_snr_gamma'``.
        snr_gamma: ``gamma`` of min-SNR weighting (5.0 is the paper's recommendation).

    Returns:
        A :class:`DiffusionLoss`.
    """
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    per_sample_mse = jnp.mean(err.reshape(err.shape[0], -1), axis=1)
    if loss_weighting == "none":
        weights = jnp.ones_like(per_sample_mse)
    else:
        if schedule is None:
            raise ValueError(f"loss_weighting={loss_weighting!r} needs the noise schedule.")
        weights = loss_weights(schedule, timesteps, prediction_type, loss_weighting, snr_gamma)
    per_sample_loss = weights * per_sample_mse
    return DiffusionLoss(jnp.mean(per_sample_loss), per_sample_loss, per_sample_mse, weights)


def timestep_buckets(
    timesteps: jax.Array,
    per_sample_loss: jax.Array,
    num_buckets: int = 10,
    num_train_timesteps: int = 1000,
) -> tuple[jax.Array, jax.Array]:
    """Sums losses into equal-width timestep buckets, for loss-vs-noise-level curves.

    Returns sums and counts rather than means so the trainer can accumulate over steps (and across hosts)
    and divide once when logging; empty buckets then need no special case inside jit.

    Args:
        timesteps: integer timesteps ``(B,)``.
        per_sample_loss: ``(B,)``.
        num_buckets: ``K``; bucket ``k`` holds ``t`` in ``[k T / K, (k+1) T / K)``.
        num_train_timesteps: ``T``.

    Returns:
        ``(sums, counts)``, float32 arrays of shape ``(K,)``.
    """
    bucket = (timesteps.astype(jnp.int32) * num_buckets) // num_train_timesteps
    bucket = jnp.clip(bucket, 0, num_buckets - 1)
    sums = jax.ops.segment_sum(per_sample_loss.astype(jnp.float32), bucket, num_segments=num_buckets)
    counts = jax.ops.segment_sum(jnp.ones_like(per_sample_loss, jnp.float32), bucket, num_segments=num_buckets)
    return sums, counts
