"""Samplers (DDIM, DPM-Solver++(2M)) and double-condition classifier-free guidance.

Everything model-specific enters through ``model_fn(x, t, text, image) -> prediction``; this module knows
nothing about U-Nets.

Design choices, and why:

* **Timesteps** reproduce diffusers exactly: :func:`ddim_timesteps` = ``DDIMScheduler.set_timesteps`` and
  :func:`dpmsolver_timesteps` = ``DPMSolverMultistepScheduler.set_timesteps``. The defaults of
  :func:`sample` are ModelScope-T2V's scheduler config (``"leading"`` spacing, ``steps_offset=1``,
  ``set_alpha_to_one=False``: the last step lands on ``abar_0``, not on ``1``), so 50 DDIM steps visit
  981, 961, ..., 1 like ModelScope's own sampler.
* **DPM-Solver++(2M)** is diffusers' ``DPMSolverMultistepScheduler`` with its defaults
  (``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``,
  ``lower_order_final=True``, ``euler_at_final=False``, no Karras sigmas, ``lambda_min_clipped=-inf``,
  no thresholding) except the final noise level, which here follows ``set_alpha_to_one`` like DDIM does:
  ``False`` (default) = diffusers ``final_sigmas_type="sigma_min"`` (stop at ``abar_0``, as ModelScope's
  DDIM), ``True`` = ``final_sigmas_type="zero"`` (diffusers' default; stop at the clean ``x0`` estimate).
  The solver's only state, the previous step's ``x0`` estimate, is carried explicitly in
  :class:`SamplerState`.
* **Guidance** runs the three conditionals as one batched ``model_fn`` call, laid out sample-major
  (rows ``3b, 3b+1, 3b+2`` are sample ``b``'s uncond / image / full branches). A batch sharded over
  devices along its leading axis therefore keeps each sample's three branches on the sample's own
  device, and the combine is a reshape, not a gather across the batch.
* **Compile once**: guidance scales, ``eta`` and PRNG keys are traced inputs of :data:`guided_step`
  (and of :data:`guided_scan`), and per-step timesteps are data, so changing any of them -- or the number
  of steps, for the Python loop -- reuses the compiled step. ``model_fn`` is passed *as an argument*; give
  a ``jax.tree_util.Partial(apply_fn, params)`` so parameters are traced inputs rather than constants baked
  into the executable (a new plain closure per call would also force a new compilation).
* **Per-sample randomness**: every sample ``b`` gets its own key (``fold_in(key, b)`` unless per-sample keys
  are given), so a sample's noise -- and with a batch-independent ``model_fn`` its whole trajectory --
  does not depend on the batch it is in or on how the batch is sharded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dreamvideo_jax.diffusion.schedules import NoiseSchedule, add_noise, canonical_prediction_type, expand

Spacing = Literal["leading", "trailing", "linspace"]
SamplerName = Literal["ddim", "dpmpp_2m"]
ModelFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

# fold_in salt for the initial noise; step noise uses the step index (< num_train_timesteps), never this.
_INITIAL_NOISE_SALT = 0x7FFFFFFF
# diffusers' DPM-Solver clamps a zero terminal abar to 2**-24 (sqrt: 2**-12) so log-SNR stays finite.
_MIN_SQRT_ALPHA_CUMPROD = 2.0**-12


# --------------------------------------------------------------------------------------------------------
# Timesteps (host side, numpy: they define the loop, they are not traced).


def _check_range(timesteps: np.ndarray, num_train_timesteps: int) -> np.ndarray:
    if timesteps.size and (timesteps.min() < 0 or timesteps.max() >= num_train_timesteps):
        raise ValueError(
            f"Timesteps {timesteps.tolist()} leave [0, {num_train_timesteps}); lower steps_offset or the step count."
        )
    return timesteps.astype(np.int32)


def ddim_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    spacing: Spacing = "leading",
    steps_offset: int = 1,
) -> np.ndarray:
    """Decreasing DDIM timesteps, equal to diffusers ``DDIMScheduler.set_timesteps``.

    Defaults are ModelScope-T2V's: ``leading`` spacing with ``steps_offset=1`` (50 steps -> 981, ..., 1).
    ``trailing`` (Lin et al., 2023) starts at ``T-1``, which zero-terminal-SNR models need.

    Args:
        num_inference_steps: number of sampling steps ``N <= T``.
        num_train_timesteps: ``T``.
        spacing: ``'leading' | 'trailing' | 'linspace'``.
        steps_offset: added to ``leading`` timesteps only (as in diffusers).

    Returns:
        int32 numpy array ``(N,)``.
    """
    n, big_t = num_inference_steps, num_train_timesteps
    if not 0 < n <= big_t:
        raise ValueError(f"num_inference_steps must be in [1, {big_t}], got {n}.")
    if spacing == "linspace":
        ts = np.linspace(0, big_t - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (big_t // n)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"Unknown spacing {spacing!r}; expected 'leading', 'trailing' or 'linspace'.")
    return _check_range(ts, big_t)


def dpmsolver_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    spacing: Spacing = "leading",
    steps_offset: int = 1,
) -> np.ndarray:
    """Decreasing DPM-Solver timesteps, equal to diffusers ``DPMSolverMultistepScheduler.set_timesteps``.

    diffusers spaces these differently from DDIM (``N + 1`` points with the last dropped), so a pipeline
    whose DDIM config is swapped for DPM-Solver via ``from_config`` visits these timesteps; we match that.
    (diffusers' own default for this scheduler is ``linspace`` with offset 0; the defaults here follow the
    ModelScope config like :func:`ddim_timesteps`.)

    Returns:
        int32 numpy array ``(N,)``.
    """
    n, big_t = num_inference_steps, num_train_timesteps
    if not 0 < n <= big_t:
        raise ValueError(f"num_inference_steps must be in [1, {big_t}], got {n}.")
    if spacing == "linspace":
        ts = np.linspace(0, big_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = big_t // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ts = np.arange(big_t, 0, -big_t / n).round().astype(np.int64) - 1
    else:
        raise ValueError(f"Unknown spacing {spacing!r}; expected 'leading', 'trailing' or 'linspace'.")
    return _check_range(ts, big_t)


class StepPlan(NamedTuple):
    """Per-step integer inputs of the sampler, one row per step (host-side numpy, int32 ``(N,)`` each).

    Attributes:
        index: step number ``i`` (seeds the step's noise).
        t: the timestep the model is evaluated at.
        t_prev: the timestep stepped to (diffusers' ``prev_timestep``); ``-1`` = the final level
            (``abar_0`` or ``1``, see ``set_alpha_to_one``).
        t_last: the timestep of the previous solver step (DPM-Solver history); ``-1`` at ``i = 0``.
        second_order: 1 where DPM-Solver++(2M) takes a second-order step, else 0 (first order).
    """

    index: np.ndarray
    t: np.ndarray
    t_prev: np.ndarray
    t_last: np.ndarray
    second_order: np.ndarray

    def rows(self) -> np.ndarray:
        """The plan as one int32 ``(N, 5)`` array: one host-to-device transfer per step, and ``scan``'s xs."""
        return np.stack(list(self), axis=1).astype(np.int32)


def sampling_plan(timesteps: np.ndarray, set_alpha_to_one: bool = False) -> StepPlan:
    """Builds the per-step plan for a decreasing timestep sequence.

    Each step goes to the *next timestep in the list* (``-1`` after the last). For ``leading`` spacing, and
    ``trailing`` when ``N`` divides ``T``, that is exactly diffusers DDIM's ``t - T // N``; for ``linspace``
    (or uneven ``trailing``) diffusers' DDIM steps to ``t - T // N`` instead, which is not a listed
    timestep -- we keep the consistent choice (DPM-Solver in diffusers also uses the next listed level).

    The second-order flags follow diffusers' ``lower_order_final`` rule: first order on the first step, and
    on the last step if ``N < 15`` or the final level is ``abar = 1`` (``final_sigmas_type="zero"``).
    """
    ts = np.asarray(timesteps, dtype=np.int64)
    n = ts.shape[0]
    index = np.arange(n)
    t_prev = np.concatenate([ts[1:], [-1]])
    t_last = np.concatenate([[-1], ts[:-1]])
    second = index > 0
    if n > 0 and (n < 15 or set_alpha_to_one):
        second[-1] = False
    as_i32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
    return StepPlan(as_i32(index), as_i32(ts), as_i32(t_prev), as_i32(t_last), as_i32(second))


# --------------------------------------------------------------------------------------------------------
# Single-step updates (pure, jittable; t may be traced scalars or (B,) arrays).


def _scales_at(
    schedule: NoiseSchedule, t: jax.Array, set_alpha_to_one: bool, min_alpha: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))`` with ``t = -1`` meaning the final level."""
    t = jnp.asarray(t, jnp.int32)
    alpha_tab = schedule.sqrt_alphas_cumprod
    if min_alpha:
        alpha_tab = jnp.maximum(alpha_tab, min_alpha)
    safe = jnp.clip(t, 0, schedule.num_train_timesteps - 1)
    alpha, sigma = alpha_tab[safe], schedule.sqrt_one_minus_alphas_cumprod[safe]
    if set_alpha_to_one:
        final_alpha, final_sigma = jnp.float32(1.0), jnp.float32(0.0)
    else:
        final_alpha, final_sigma = alpha_tab[0], schedule.sqrt_one_minus_alphas_cumprod[0]
    final = t < 0
    return jnp.where(final, final_alpha, alpha), jnp.where(final, final_sigma, sigma)


def _convert(alpha, sigma, x_t, model_output, prediction_type):
    """``(x0, eps)`` from a model output given broadcastable signal/noise scales."""
    if prediction_type == "eps":
        return (x_t - sigma * model_output) / alpha, model_output
    if prediction_type == "v":
        return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t
    return model_output, (x_t - alpha * model_output) / sigma


def ddim_step(
    schedule: NoiseSchedule,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    model_output: jax.Array,
    prediction_type: str,
    eta: float | jax.Array = 0.0,
    noise: jax.Array | None = None,
    *,
    set_alpha_to_one: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update ``x_t -> x_{t_prev}`` (Song et al., 2021, eq. 12), as diffusers ``DDIMScheduler.step``.

    Matches diffusers with ``clip_sample=False``, no thresholding, ``use_clipped_model_output=False``.

    Args:
        schedule: the noise schedule.
        x_t: current sample ``(B, ...)``.
        t: current timestep, scalar or ``(B,)``.
        t_prev: timestep to step to; ``-1`` = final level (``abar_0``, or 1 with ``set_alpha_to_one``).
        model_output: (guided) network output, same shape as ``x_t``.
        prediction_type: ``'eps' | 'v' | 'x0'`` (or a diffusers alias).
        eta: 0 = deterministic DDIM, 1 = DDPM-like ancestral noise; may be traced.
        noise: standard normal noise like ``x_t`` for ``eta > 0``; ``None`` means no noise term (only correct
            for ``eta = 0``).
        set_alpha_to_one: the final level is ``abar = 1`` instead of ``abar_0`` (ModelScope: ``False``).

    Returns:
        ``(x_prev, x0_hat)``, float32.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    x_t = x_t.astype(jnp.float32)
    alpha_t, sigma_t = _scales_at(schedule, t, False)
    alpha_p, sigma_p = _scales_at(schedule, t_prev, set_alpha_to_one)
    out = model_output.astype(jnp.float32)
    x0, eps = _convert(expand(alpha_t, x_t), expand(sigma_t, x_t), x_t, out, prediction_type)
    # sigma_t(eta) of DDIM eq. 16, written with the stored (precise) noise scales.
    var = (sigma_p / sigma_t) ** 2 * (1.0 - (alpha_t / alpha_p) ** 2)
    std = jnp.asarray(eta, jnp.float32) * jnp.sqrt(var)
    direction = jnp.sqrt(jnp.maximum(sigma_p**2 - std**2, 0.0))
    x_prev = expand(alpha_p, x_t) * x0 + expand(direction, x_t) * eps
    if noise is not None:
        x_prev = x_prev + expand(std, x_t) * noise.astype(jnp.float32)
    return x_prev, x0


def dpmpp_2m_step(
    schedule: NoiseSchedule,
    x_t: jax.Array,
    t: jax.Array,
    t_prev: jax.Array,
    model_output: jax.Array,
    prediction_type: str,
    x0_last: jax.Array,
    t_last: jax.Array,
    second_order: jax.Array | bool,
    *,
    set_alpha_to_one: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DPM-Solver++(2M) update (Lu et al., 2022), as diffusers ``DPMSolverMultistepScheduler.step``.

    With ``rho = sigma/alpha`` and primes marking the level stepped to (so ``exp(-h) = rho'/rho``), the
    midpoint update is
    ``x' = (s'/s) x + alpha' (1 - rho'/rho) (D0 + D1/2)``, ``D0 = x0_hat``,
    ``D1 = (x0_hat - x0_last) h / h_last``; the first-order step (``D1 = 0``) is DDIM.

    Args:
        schedule: the noise schedule.
        x_t: current sample ``(B, ...)``.
        t: current timestep (scalar or ``(B,)``).
        t_prev: timestep to step to; ``-1`` = final level.
        model_output: (guided) network output.
        prediction_type: ``'eps' | 'v' | 'x0'`` (or a diffusers alias).
        x0_last: the ``x0_hat`` returned by the previous step (anything, e.g. zeros, on the first step).
        t_last: the previous step's timestep (ignored when ``second_order`` is false).
        second_order: take the second-order step (see :func:`sampling_plan`); may be traced.
        set_alpha_to_one: the final level is clean data (diffusers ``final_sigmas_type="zero"``) instead of
            ``abar_0`` (``"sigma_min"``).

    Returns:
        ``(x_prev, x0_hat)``, float32; pass ``x0_hat`` as the next step's ``x0_last``.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    x_t = x_t.astype(jnp.float32)
    amin = _MIN_SQRT_ALPHA_CUMPROD
    alpha_s, sigma_s = _scales_at(schedule, t, False, amin)
    alpha_p, sigma_p = _scales_at(schedule, t_prev, set_alpha_to_one, amin)
    alpha_l, sigma_l = _scales_at(schedule, t_last, False, amin)
    out = model_output.astype(jnp.float32)
    x0, _ = _convert(expand(alpha_s, x_t), expand(sigma_s, x_t), x_t, out, prediction_type)
    rho_s, rho_p, rho_l = sigma_s / alpha_s, sigma_p / alpha_p, sigma_l / alpha_l
    ratio = rho_p / rho_s  # exp(-h); 0 when stepping to clean data
    second_order = jnp.asarray(second_order, bool)
    # log-SNR step sizes; made finite where unused (final step to rho = 0, or no history) so no NaN leaks.
    h = jnp.log(rho_s / jnp.where(second_order, rho_p, 1.0))
    h_last = jnp.log(jnp.where(second_order, rho_l, 1.0) / rho_s)
    h = jnp.where(second_order, h, 1.0)
    h_last = jnp.where(second_order, h_last, 1.0)
    d1_scale = jnp.where(second_order, 0.5 * h / h_last, 0.0)
    d = x0 + expand(d1_scale, x_t) * (x0 - x0_last.astype(jnp.float32))
    x_prev = expand(sigma_p / sigma_s, x_t) * x_t + expand(alpha_p * (1.0 - ratio), x_t) * d
    return x_prev, x0


# --------------------------------------------------------------------------------------------------------
# Double-condition classifier-free guidance.


def double_guidance(
    out_uncond: jax.Array,
    out_img: jax.Array,
    out_full: jax.Array,
    image_scale: float | jax.Array,
    text_scale: float | jax.Array,
) -> jax.Array:
    """InstructPix2Pix guidance: ``u + s_I (i - u) + s_T (f - i)``.

    ``u`` = no image, no text; ``i`` = image only; ``f`` = image and text. ``s_I`` pushes towards the
    reference image, ``s_T`` towards the prompt. ``s_I = s_T = 1`` gives ``f``. The coefficients sum to 1,
    so guiding eps, v or x0 outputs gives the same sample.

    Scales may be scalars or per-sample ``(B,)`` arrays.
    """
    s_i = expand(jnp.asarray(image_scale, jnp.float32), out_uncond)
    s_t = expand(jnp.asarray(text_scale, jnp.float32), out_uncond)
    return out_uncond + s_i * (out_img - out_uncond) + s_t * (out_full - out_img)


def guidance_inputs(
    x: jax.Array, t: jax.Array, text_emb: jax.Array, null_text_emb: jax.Array, image: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Builds the batched inputs of the three guidance branches, sample-major.

    Row ``3b + k`` is sample ``b``'s branch ``k``: 0 = uncond (null text, zero image), 1 = image only
    (null text), 2 = full (text and image). See the module docstring for why sample-major.

    Args:
        x: latents ``(B, ...)``.
        t: timesteps, scalar or ``(B,)``.
        text_emb: ``(B, L, D)``.
        null_text_emb: encoding of ``""``, ``(L, D)`` or ``(1, L, D)``.
        image: reference-image input ``(B, ...)``.

    Returns:
        ``(x3, t3, text3, image3)`` with leading dimension ``3B``; ``t3`` is int32.
    """
    batch = x.shape[0]
    x3 = jnp.repeat(x, 3, axis=0)
    t3 = jnp.repeat(jnp.broadcast_to(jnp.asarray(t, jnp.int32), (batch,)), 3, axis=0)
    null = jnp.broadcast_to(jnp.asarray(null_text_emb, text_emb.dtype).reshape(text_emb.shape[1:]), text_emb.shape)
    text3 = jnp.stack([null, null, text_emb], axis=1).reshape((3 * batch,) + text_emb.shape[1:])
    image3 = jnp.stack([jnp.zeros_like(image), image, image], axis=1).reshape((3 * batch,) + image.shape[1:])
    return x3, t3, text3, image3


def split_guidance_output(out3: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inverse of :func:`guidance_inputs` for the model output: ``(uncond, image_only, full)``, each ``(B, ...)``."""
    grouped = out3.reshape((out3.shape[0] // 3, 3) + out3.shape[1:])
    return grouped[:, 0], grouped[:, 1], grouped[:, 2]


# --------------------------------------------------------------------------------------------------------
# Randomness.


def per_sample_keys(key: jax.Array | None, batch: int) -> jax.Array:
    """Normalises ``key`` to one typed PRNG key per sample, shape ``(B,)``.

    A single key (typed, or raw ``uint32[2]``) becomes ``fold_in(key, b)`` for sample ``b`` -- independent
    of the batch size, unlike ``split(key, B)[b]`` or one ``normal(key, (B, ...))`` draw. A batch of keys
    (typed ``(B,)`` or raw ``uint32[B, 2]``) is used as given: to reproduce sample ``b`` of a batch alone,
    pass ``per_sample_keys(key, B)[b:b+1]``. ``None`` means ``key(0)``.
    """
    if key is None:
        key = jax.random.key(0)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key.astype(jnp.uint32))
    if key.ndim == 0:
        return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch, dtype=jnp.uint32))
    if key.shape != (batch,):
        raise ValueError(f"Expected one key or {batch} per-sample keys, got key shape {key.shape}.")
    return key


def _per_sample_normal(keys: jax.Array, data: jax.Array | int, shape: tuple[int, ...]) -> jax.Array:
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, data), shape, jnp.float32))(keys)


def initial_noise(key: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """``x_T ~ N(0, I)`` of ``shape = (B, ...)``, drawn per sample (see :func:`per_sample_keys`).

    Uses a different stream than the per-step noise of :func:`sample`, so the same key can seed both.
    """
    keys = per_sample_keys(key, shape[0])
    return _per_sample_normal(keys, _INITIAL_NOISE_SALT, tuple(shape[1:]))


# --------------------------------------------------------------------------------------------------------
# The guided sampling step and loops.


class SamplerState(NamedTuple):
    """Carried between steps: the current sample and the last ``x0`` estimate (DPM history; a preview)."""

    x: jax.Array
    x0: jax.Array


class Conditioning(NamedTuple):
    """Conditions for the three guidance branches (see :func:`guidance_inputs`)."""

    text_emb: jax.Array
    null_text_emb: jax.Array
    image: jax.Array


class Knobs(NamedTuple):
    """Step-independent traced inputs: changing them never recompiles."""

    image_scale: jax.Array
    text_scale: jax.Array
    eta: jax.Array
    keys: jax.Array  # typed PRNG keys, (B,)


class Reference(NamedTuple):
    """Keyframe replacement (image-to-video with a text-to-video model, or pinning keyframes exactly): before
    every step frame 0 of the samples with ``mask`` is replaced by ``latent`` noised to the current level with the
    fixed ``noise``, and after the last step by the clean ``latent``; the same for the last frame with the
    ``last_*`` fields (first+last-frame videos and loops), where given."""

    latent: jax.Array  # (B, h, w, C) clean reference latent
    noise: jax.Array  # (B, h, w, C) fixed noise
    mask: jax.Array  # (B,) bool: replace frame 0 of this sample
    last_latent: jax.Array | None = None  # (B, h, w, C) clean last-frame latent
    last_noise: jax.Array | None = None  # (B, h, w, C) its fixed noise
    last_mask: jax.Array | None = None  # (B,) bool: replace the last frame of this sample


def _pin(x, frame: int, mask, value):
    return x.at[:, frame].set(jnp.where(mask[:, None, None, None], value, x[:, frame]))


def _as_model_pytree(model_fn: Any) -> jax.tree_util.Partial:
    return model_fn if isinstance(model_fn, jax.tree_util.Partial) else jax.tree_util.Partial(model_fn)


def _step_impl(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    state: SamplerState,
    row: jax.Array,
    cond: Conditioning,
    knobs: Knobs,
    ref: Reference | None = None,
    *,
    sampler: str,
    prediction_type: str,
    set_alpha_to_one: bool,
) -> SamplerState:
    index, t, t_prev, t_last, second = row[0], row[1], row[2], row[3], row[4] != 0
    x = state.x
    if ref is not None:  # frame 0 (and the last) := the keyframe latent noised to the current level
        tb = jnp.broadcast_to(t, (x.shape[0],))
        x = _pin(x, 0, ref.mask, add_noise(schedule, ref.latent, ref.noise, tb))
        if ref.last_mask is not None:
            x = _pin(x, -1, ref.last_mask, add_noise(schedule, ref.last_latent, ref.last_noise, tb))
    x3, t3, text3, image3 = guidance_inputs(x, t, cond.text_emb, cond.null_text_emb, cond.image)
    out = model_fn(x3, t3, text3, image3).astype(jnp.float32)
    guided = double_guidance(*split_guidance_output(out), knobs.image_scale, knobs.text_scale)
    if sampler == "ddim":
        noise = _per_sample_normal(knobs.keys, index.astype(jnp.uint32), x.shape[1:])
        x_new, x0 = ddim_step(
            schedule, x, t, t_prev, guided, prediction_type, knobs.eta, noise, set_alpha_to_one=set_alpha_to_one
        )
    elif sampler == "dpmpp_2m":
        x_new, x0 = dpmpp_2m_step(
            schedule, x, t, t_prev, guided, prediction_type, state.x0, t_last, second,
            set_alpha_to_one=set_alpha_to_one,
        )  # fmt: skip
    else:
        raise ValueError(f"Unknown sampler {sampler!r}; expected 'ddim' or 'dpmpp_2m'.")
    if ref is not None:  # after the last step the keyframes are the clean latents
        x_new = _pin(x_new, 0, (t_prev < 0) & ref.mask, ref.latent)
        if ref.last_mask is not None:
            x_new = _pin(x_new, -1, (t_prev < 0) & ref.last_mask, ref.last_latent)
    return SamplerState(x_new, x0)


_STATIC = ("sampler", "prediction_type", "set_alpha_to_one")

guided_step = jax.jit(_step_impl, static_argnames=_STATIC)
"""One guided denoising step, jitted: ``guided_step(model_fn, schedule, state, row, cond, knobs, ref=None, *,
sampler, prediction_type, set_alpha_to_one) -> SamplerState``. ``row`` is one row of :meth:`StepPlan.rows`;
``ref`` an optional :class:`Reference` (keyframe replacement).
Compiles once per input shapes/dtypes, ``model_fn`` pytree structure and static options;
``guided_step._cache_size()`` counts compilations."""


def _scan_impl(model_fn, schedule, state, rows, cond, knobs, ref=None, *, sampler, prediction_type,
               set_alpha_to_one):
    def body(carry, row):
        new = _step_impl(
            model_fn, schedule, carry, row, cond, knobs, ref,
            sampler=sampler, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one,
        )  # fmt: skip
        return new, None

    final, _ = jax.lax.scan(body, state, rows)
    return final


guided_scan = jax.jit(_scan_impl, static_argnames=_STATIC)
"""The whole loop as one ``lax.scan``, jitted; same arguments as :data:`guided_step` but ``rows`` is the full
``(N, 5)`` plan. Compiles once per step count as well."""


def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    x_T: jax.Array,
    *,
    text_emb: jax.Array,
    null_text_emb: jax.Array,
    image: jax.Array,
    image_scale: float | jax.Array,
    text_scale: float | jax.Array,
    sampler: SamplerName = "ddim",
    num_steps: int = 50,
    eta: float | jax.Array = 0.0,
    prediction_type: str = "eps",
    key: jax.Array | None = None,
    loop: Literal["python", "scan"] = "python",
    timestep_spacing: Spacing = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = False,
    callback: Callable[[int, int, SamplerState], None] | None = None,
) -> jax.Array:
    """Samples from ``x_T`` with double-condition guidance.

    Args:
        model_fn: ``model_fn(x (3B, ...), t (3B,) int32, text (3B, L, D), image (3B, ...)) -> (3B, ...)``,
            pure. Prefer ``jax.tree_util.Partial(apply_fn, params)``: the parameters are then traced inputs
            (no constant folding, no recompilation when they change); the function must not mix samples.
        schedule: the noise schedule the model was trained with.
        x_T: initial noise ``(B, ...)``, e.g. :func:`initial_noise`.
        text_emb: prompt encodings ``(B, L, D)``.
        null_text_emb: encoding of ``""`` ``(L, D)`` or ``(1, L, D)``.
        image: reference-image input of the image branch ``(B, ...)`` (zeros are its "no image").
        image_scale: ``s_I``; traced.
        text_scale: ``s_T``; traced.
        sampler: ``'ddim'`` or ``'dpmpp_2m'``.
        num_steps: number of model evaluations (each is one batched call of ``3B`` rows).
        eta: DDIM noise scale (0 = deterministic); traced. Must be 0 for ``'dpmpp_2m'``.
        prediction_type: the model's target, ``'eps' | 'v' | 'x0'`` (or a diffusers alias).
        key: one PRNG key or per-sample keys (see :func:`per_sample_keys`); only used when ``eta > 0``.
        loop: ``'python'`` (a Python loop over :data:`guided_step`; supports ``callback``) or ``'scan'``
            (:data:`guided_scan`, one executable per step count).
        timestep_spacing: see :func:`ddim_timesteps` / :func:`dpmsolver_timesteps`.
        steps_offset: see :func:`ddim_timesteps`.
        set_alpha_to_one: final level ``abar = 1`` (clean) instead of ``abar_0``.
        callback: ``callback(step, timestep, state)`` after each step of the Python loop. It receives device
            arrays and does not block unless it reads them.

    Returns:
        The final sample, float32, shape of ``x_T``.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    if sampler not in ("ddim", "dpmpp_2m"):
        raise ValueError(f"Unknown sampler {sampler!r}; expected 'ddim' or 'dpmpp_2m'.")
    if sampler == "dpmpp_2m" and not isinstance(eta, jax.Array) and eta != 0:
        raise ValueError("eta applies to DDIM only; DPM-Solver++(2M) is deterministic.")
    if loop == "scan" and callback is not None:
        raise ValueError("callback needs loop='python'.")
    make_ts = ddim_timesteps if sampler == "ddim" else dpmsolver_timesteps
    timesteps = make_ts(num_steps, schedule.num_train_timesteps, timestep_spacing, steps_offset)
    rows = sampling_plan(timesteps, set_alpha_to_one).rows()

    batch = x_T.shape[0]
    model = _as_model_pytree(model_fn)
    cond = Conditioning(jnp.asarray(text_emb), jnp.asarray(null_text_emb), jnp.asarray(image))
    knobs = Knobs(
        jnp.asarray(image_scale, jnp.float32),
        jnp.asarray(text_scale, jnp.float32),
        jnp.asarray(eta, jnp.float32),
        per_sample_keys(key, batch),
    )
    x_T = jnp.asarray(x_T, jnp.float32)
    state = SamplerState(x_T, jnp.zeros_like(x_T))
    static = dict(sampler=sampler, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    if loop == "scan":
        return guided_scan(model, schedule, state, rows, cond, knobs, **static).x
    if loop != "python":
        raise ValueError(f"Unknown loop {loop!r}; expected 'python' or 'scan'.")
    for i, row in enumerate(rows):
        state = guided_step(model, schedule, state, row, cond, knobs, **static)
        if callback is not None:
            callback(i, int(row[1]), state)
    return state.x
