"""Variance-preserving noise schedules and prediction-target conversions.

The forward process is ``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps`` with discrete ``t in [0, T)``.
Everything here is a pure function of a :class:`NoiseSchedule` (a pytree of float32 tables), so it can be
closed over or passed through ``jax.jit`` without retracing when the schedule's values change.

Tables are computed in float64 with numpy and cast once to float32. That is slightly *more* precise than
diffusers (which accumulates ``cumprod`` in float32); the two agree to ~1e-6 absolute, well inside what a
float32 model can resolve.

Prediction targets (what the network outputs):

* ``'eps'`` -- the added noise (ModelScope-T2V weights use this).
* ``'v'`` -- ``v = sqrt(abar) * eps - sqrt(1 - abar) * x0`` (Salimans & Ho, 2022).
* ``'x0'`` -- the clean sample.

diffusers' names ``'epsilon'``, ``'v_prediction'`` and ``'sample'`` are accepted as aliases so scheduler
configs can be passed through unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

ScheduleKind = Literal["scaled_linear", "linear", "squaredcos_cap_v2"]
PredictionType = Literal["eps", "v", "x0"]

_PREDICTION_ALIASES = {
    "eps": "eps",
    "epsilon": "eps",
    "v": "v",
    "v_prediction": "v",
    "x0": "x0",
    "sample": "x0",
}


def canonical_prediction_type(prediction_type: str) -> str:
    """Maps a prediction-type name (ours or diffusers') to one of ``'eps' | 'v' | 'x0'``.

    Raises:
        ValueError: for unknown names, listing the accepted ones (a typo in a config should fail loudly,
            not silently train the wrong target).
    """
    try:
        return _PREDICTION_ALIASES[prediction_type]
    except KeyError:
        raise ValueError(
            f"Unknown prediction_type {prediction_type!r}; expected one of {sorted(_PREDICTION_ALIASES)}."
        ) from None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep tables of a discrete VP diffusion, all float32 arrays of shape ``(T,)``.

    Being a registered pytree (no static fields), a schedule can be an argument of a jitted function; two
    schedules of the same length share one compilation.

    Attributes:
        betas: ``beta_t``.
        alphas_cumprod: ``abar_t = prod_{s<=t} (1 - beta_s)``.
        sqrt_alphas_cumprod: ``sqrt(abar_t)`` (the signal scale, "alpha_t" in DPM-Solver notation).
        sqrt_one_minus_alphas_cumprod: ``sqrt(1 - abar_t)`` (the noise scale, "sigma_t"). Stored rather than
            derived because ``1 - abar`` loses ~5 significant digits in float32 near ``t = 0``.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array

    @property
    def num_train_timesteps(self) -> int:
        """``T``, static (it is a shape)."""
        return self.betas.shape[0]


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, discretised exactly as diffusers' ``betas_for_alpha_bar``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1.0 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
            for i in range(num_train_timesteps)
        ],
        dtype=np.float64,
    )


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shifts and scales ``sqrt(abar)`` so the last step has zero SNR (Lin et al., 2023, Algorithm 1)."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


# The `diffusion` config section: the training noise schedule, ModelScope-T2V's by default.
DEFAULTS = dict(
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    rescale_zero_terminal_snr=False,
)


def make_betas(
    kind: ScheduleKind = DEFAULTS["beta_schedule"],
    num_train_timesteps: int = DEFAULTS["num_train_timesteps"],
    beta_start: float = DEFAULTS["beta_start"],
    beta_end: float = DEFAULTS["beta_end"],
    rescale_zero_terminal_snr: bool = DEFAULTS["rescale_zero_terminal_snr"],
) -> np.ndarray:
    """The float64 betas behind :func:`make_schedule` (host-side numpy; same arguments).

    Useful where float32 is not enough, e.g. as a high-precision oracle: ``1 - abar`` near ``t = 0``
    keeps only ~2 significant digits in float32.
    """
    if kind == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"Unknown schedule kind {kind!r}; expected 'scaled_linear', 'linear' or 'squaredcos_cap_v2'.")
    if rescale_zero_terminal_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def make_schedule(
    kind: ScheduleKind = DEFAULTS["beta_schedule"],
    num_train_timesteps: int = DEFAULTS["num_train_timesteps"],
    beta_start: float = DEFAULTS["beta_start"],
    beta_end: float = DEFAULTS["beta_end"],
    rescale_zero_terminal_snr: bool = DEFAULTS["rescale_zero_terminal_snr"],
) -> NoiseSchedule:
    """Builds a noise schedule equal to diffusers' ``DDPMScheduler``/``DDIMScheduler`` tables.

    The defaults are ModelScope-T2V's (``linear_sd`` = diffusers ``scaled_linear``, 0.00085 -> 0.012, 1000
    steps), which a model initialised from ModelScope weights must keep.

    Args:
        kind: ``'scaled_linear'`` (``linspace(sqrt(b0), sqrt(b1))**2``), ``'linear'`` or
            ``'squaredcos_cap_v2'`` (cosine; ignores ``beta_start``/``beta_end``).
        num_train_timesteps: ``T``.
        beta_start: first beta.
        beta_end: last beta.
        rescale_zero_terminal_snr: rescale so ``abar_{T-1} = 0``. Only sensible with ``'v'`` or ``'x0'``
            prediction: an eps model cannot recover ``x0`` from pure noise.

    Returns:
        The schedule, float32 tables computed in float64.
    """
    betas = make_betas(kind, num_train_timesteps, beta_start, beta_end, rescale_zero_terminal_snr)
    abar = np.cumprod(1.0 - betas)
    f32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    return NoiseSchedule(
        betas=f32(betas),
        alphas_cumprod=f32(abar),
        sqrt_alphas_cumprod=f32(np.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
    )


def section(diffusion=None) -> dict:
    """A config's `diffusion` section over :data:`DEFAULTS` (missing keys take the default).

    Raises:
        ValueError: unknown keys (a typo must not silently fall back to a default).
    """
    given = dict(diffusion.to_dict() if hasattr(diffusion, "to_dict") else diffusion or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"diffusion: unknown config keys {unknown}; known keys are {sorted(DEFAULTS)}")
    return {**DEFAULTS, **given}


def from_config(diffusion=None) -> NoiseSchedule:
    """The schedule of a config's `diffusion` section (see :func:`section`)."""
    d = section(diffusion)
    return make_schedule(str(d["beta_schedule"]), int(d["num_train_timesteps"]), float(d["beta_start"]),
                         float(d["beta_end"]), bool(d["rescale_zero_terminal_snr"]))


def expand(coef: jax.Array, like: jax.Array) -> jax.Array:
    """Right-pads ``coef`` (shape ``()`` or ``(B,)``) with singleton axes so it broadcasts over ``like``."""
    coef = jnp.asarray(coef)
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def signal_noise_scales(schedule: NoiseSchedule, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(sqrt(abar_t), sqrt(1 - abar_t))`` gathered at integer timesteps ``t`` (any shape)."""
    t = jnp.asarray(t, jnp.int32)
    return schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at integer timesteps ``t``."""
    alpha, sigma = signal_noise_scales(schedule, t)
    return (alpha / sigma) ** 2


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Samples ``x_t ~ q(x_t | x0)`` given the noise: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Args:
        schedule: the noise schedule.
        x0: clean data, shape ``(B, ...)`` (e.g. video latents ``(B, F, h, w, C)``).
        noise: standard normal noise, same shape as ``x0``.
        t: integer timesteps, shape ``(B,)`` (or a scalar), broadcast over the trailing axes.
    """
    alpha, sigma = signal_noise_scales(schedule, t)
    return expand(alpha, x0) * x0 + expand(sigma, x0) * noise


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (diffusers ``get_velocity``)."""
    alpha, sigma = signal_noise_scales(schedule, t)
    return expand(alpha, x0) * noise - expand(sigma, x0) * x0


def training_target(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction_type: str
) -> jax.Array:
    """What the network should output for ``x_t = add_noise(schedule, x0, noise, t)``.

    Args:
        schedule: the noise schedule.
        x0: clean data ``(B, ...)``.
        noise: the noise used to make ``x_t``.
        t: integer timesteps ``(B,)``.
        prediction_type: ``'eps' | 'v' | 'x0'`` (or a diffusers alias).
    """
    prediction_type = canonical_prediction_type(prediction_type)
    if prediction_type == "eps":
        return noise
    if prediction_type == "v":
        return velocity(schedule, x0, noise, t)
    return x0


def to_x0_eps(
    schedule: NoiseSchedule, x_t: jax.Array, t: jax.Array, model_output: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """Converts a model output of any target type into ``(x0_hat, eps_hat)``.

    Samplers work with both estimates, so converting here once lets every sampler support every target.
    The conversion is affine in ``model_output`` with ``x_t``-terms whose coefficients do not depend on
    the output, which is why classifier-free guidance gives the same result whether it combines raw eps,
    v or x0 outputs.

    Args:
        schedule: the noise schedule.
        x_t: noisy sample ``(B, ...)``.
        t: integer timesteps ``(B,)`` or a scalar.
        model_output: network output, same shape as ``x_t``.
        prediction_type: ``'eps' | 'v' | 'x0'`` (or a diffusers alias).

    Returns:
        ``(x0_hat, eps_hat)``, both float32. With a zero-terminal-SNR schedule an eps model yields
        ``inf`` at ``t = T-1`` (``sqrt(abar) = 0``), as in diffusers.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    x_t = x_t.astype(jnp.float32)
    model_output = model_output.astype(jnp.float32)
    alpha, sigma = signal_noise_scales(schedule, t)
    alpha, sigma = expand(alpha, x_t), expand(sigma, x_t)
    if prediction_type == "eps":
        eps = model_output
        x0 = (x_t - sigma * eps) / alpha
    elif prediction_type == "v":
        x0 = alpha * x_t - sigma * model_output
        eps = alpha * model_output + sigma * x_t
    else:
        x0 = model_output
        eps = (x_t - alpha * x0) / sigma
    return x0, eps
