"""Samplers and guidance: timestep and step parity with diffusers, a known-answer test on Gaussian data,
double guidance, determinism, batch independence and compile-once behaviour."""

import functools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import jax
import jax.numpy as jnp

from dreamvideo_jax.diffusion import samplers as SM
from dreamvideo_jax.diffusion import schedules as S

DIFFUSERS_PTYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHED_KW = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012)


# ----------------------------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize(
    "n,spacing,offset",
    [(50, "leading", 1), (25, "leading", 0), (30, "leading", 1), (7, "leading", 1), (50, "trailing", 0),
     (30, "trailing", 0), (20, "linspace", 0), (1, "leading", 1), (1000, "linspace", 0)],
)  # fmt: skip
def test_ddim_timesteps_match_diffusers(n, spacing, offset):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset, **SCHED_KW)
    ref.set_timesteps(n)
    np.testing.assert_array_equal(SM.ddim_timesteps(n, 1000, spacing, offset), ref.timesteps.numpy())


def test_ddim_timesteps_modelscope():
    ts = SM.ddim_timesteps(50)  # leading, offset 1: ModelScope's (1 + arange(0, 1000, 20)).flip()
    np.testing.assert_array_equal(ts, 1 + np.arange(0, 1000, 20)[::-1])
    with pytest.raises(ValueError):
        SM.ddim_timesteps(1000, spacing="leading", steps_offset=1)  # 1000 would leave [0, T)


@pytest.mark.parametrize(
    "n,spacing,offset",
    [(20, "leading", 1), (50, "leading", 1), (20, "linspace", 0), (25, "trailing", 0), (7, "trailing", 0)],
)
def test_dpmsolver_timesteps_match_diffusers(n, spacing, offset):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=offset, **SCHED_KW)
    ref.set_timesteps(n)
    np.testing.assert_array_equal(SM.dpmsolver_timesteps(n, 1000, spacing, offset), ref.timesteps.numpy())


# ------------------------------------------------------------------------------------ step parity (diffusers)


@functools.partial(jax.jit, static_argnames=("ptype", "one"))
def _ddim(schedule, x, t, t_prev, out, eta, noise, *, ptype, one):
    return SM.ddim_step(schedule, x, t, t_prev, out, ptype, eta, noise, set_alpha_to_one=one)


@functools.partial(jax.jit, static_argnames=("ptype", "one"))
def _dpm(schedule, x, t, t_prev, out, x0_last, t_last, second, *, ptype, one):
    return SM.dpmpp_2m_step(schedule, x, t, t_prev, out, ptype, x0_last, t_last, second, set_alpha_to_one=one)


def _random_trajectory_inputs(n, shape=(2, 3, 4, 4, 2), seed=0):
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal(shape).astype(np.float32)
    outputs = rng.standard_normal((n,) + shape).astype(np.float32)
    noises = rng.standard_normal((n,) + shape).astype(np.float32)
    return x_T, outputs, noises


def _assert_close_rel(ours, ref, rel=1e-5):
    ours, ref = np.asarray(ours), np.asarray(ref)
    err = np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref)))
    assert err < rel, err


def _float64_ddim(kind="scaled_linear", rescale=False, **config):
    """diffusers' DDIMScheduler evaluated in float64 on float64 tables: a high-precision oracle.

    In float32 diffusers computes ``1 - abar`` from a float32 ``abar``, which near ``t = 0`` is ~4e-5
    relative off (our tables store ``sqrt(1 - abar)`` from float64 and are ~1e-7 off), so a float32
    comparison would measure diffusers' rounding, not our step.
    """
    ref = DDIMScheduler(beta_schedule=kind, rescale_betas_zero_snr=rescale, clip_sample=False, **config, **SCHED_KW)
    abar = np.cumprod(1.0 - S.make_betas(kind, 1000, 0.00085, 0.012, rescale))
    ref.alphas_cumprod = torch.from_numpy(abar)
    one = torch.tensor(1.0, dtype=torch.float64)
    ref.final_alpha_cumprod = one if config["set_alpha_to_one"] else ref.alphas_cumprod[0]
    return ref


def _t64(a):
    return torch.from_numpy(np.asarray(a, np.float64))


@pytest.mark.parametrize(
    "ptype,kind,rescale,n,spacing,offset,one,eta",
    [
        ("eps", "scaled_linear", False, 50, "leading", 1, False, 0.0),  # ModelScope
        ("v", "scaled_linear", False, 50, "leading", 1, False, 0.0),
        ("x0", "scaled_linear", False, 50, "leading", 1, False, 0.0),
        ("eps", "scaled_linear", False, 20, "trailing", 0, True, 1.0),
        ("v", "squaredcos_cap_v2", True, 10, "trailing", 0, True, 0.5),  # I2VGen-XL style config
        ("x0", "linear", False, 25, "leading", 0, False, 0.3),
    ],
)
def test_ddim_trajectory_matches_diffusers(ptype, kind, rescale, n, spacing, offset, one, eta):
    schedule = S.make_schedule(kind, rescale_zero_terminal_snr=rescale, **SCHED_KW)
    ref = _float64_ddim(kind, rescale, set_alpha_to_one=one, steps_offset=offset, timestep_spacing=spacing,
                        prediction_type=DIFFUSERS_PTYPE[ptype])  # fmt: skip
    ref.set_timesteps(n)
    x_T, outputs, noises = _random_trajectory_inputs(n)
    plan = SM.sampling_plan(SM.ddim_timesteps(n, 1000, spacing, offset), one)
    np.testing.assert_array_equal(plan.t, ref.timesteps.numpy())
    x_ref, x = _t64(x_T), jnp.asarray(x_T)
    for i, t in enumerate(ref.timesteps):
        noise = noises[i] if eta > 0 else None
        res = ref.step(_t64(outputs[i]), t, x_ref, eta=eta, variance_noise=None if noise is None else _t64(noise))
        x_ref = res.prev_sample
        x, x0 = _ddim(schedule, x, plan.t[i], plan.t_prev[i], outputs[i], eta, noise, ptype=ptype, one=one)
        _assert_close_rel(x0, res.pred_original_sample.numpy())
        _assert_close_rel(x, x_ref.numpy())
    # And against diffusers as shipped (float32): agreement limited by its float32 `1 - abar`.
    ref32 = DDIMScheduler(
        beta_schedule=kind, rescale_betas_zero_snr=rescale, clip_sample=False, set_alpha_to_one=one,
        steps_offset=offset, timestep_spacing=spacing, prediction_type=DIFFUSERS_PTYPE[ptype], **SCHED_KW,
    )  # fmt: skip
    ref32.set_timesteps(n)
    x_ref = torch.from_numpy(x_T)
    for i, t in enumerate(ref32.timesteps):
        noise = torch.from_numpy(noises[i]) if eta > 0 else None
        x_ref = ref32.step(torch.from_numpy(outputs[i]), t, x_ref, eta=eta, variance_noise=noise).prev_sample
    _assert_close_rel(x, x_ref.numpy(), rel=1e-4)


def test_ddim_step_linspace_with_diffusers_prev_rule():
    """For 'linspace' spacing diffusers' DDIM steps to t - T // N; given the same t_prev, the update matches."""
    n, schedule = 20, S.make_schedule()
    ref = _float64_ddim(set_alpha_to_one=False, timestep_spacing="linspace")
    ref.set_timesteps(n)
    x_T, outputs, _ = _random_trajectory_inputs(n, seed=3)
    x_ref, x = _t64(x_T), jnp.asarray(x_T)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(_t64(outputs[i]), t, x_ref).prev_sample
        t_prev = max(int(t) - 1000 // n, -1)
        x, _ = _ddim(schedule, x, int(t), t_prev, outputs[i], 0.0, None, ptype="eps", one=False)
    _assert_close_rel(x, x_ref.numpy())


@pytest.mark.parametrize(
    "ptype,n,spacing,offset,one",
    [
        ("eps", 20, "leading", 1, False),  # second order up to the last step
        ("v", 20, "leading", 1, False),
        ("x0", 20, "leading", 1, False),
        ("eps", 10, "linspace", 0, False),  # lower_order_final (N < 15)
        ("v", 16, "trailing", 0, True),  # final_sigmas_type="zero": last step first order
        ("x0", 12, "linspace", 0, True),
    ],
)
def test_dpmpp_2m_trajectory_matches_diffusers(ptype, n, spacing, offset, one):
    schedule = S.make_schedule()
    ref = DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", algorithm_type="dpmsolver++", solver_order=2,
        final_sigmas_type="zero" if one else "sigma_min", timestep_spacing=spacing, steps_offset=offset,
        prediction_type=DIFFUSERS_PTYPE[ptype], **SCHED_KW,
    )  # fmt: skip
    ref.set_timesteps(n)
    plan = SM.sampling_plan(SM.dpmsolver_timesteps(n, 1000, spacing, offset), one)
    np.testing.assert_array_equal(plan.t, ref.timesteps.numpy())
    x_T, outputs, _ = _random_trajectory_inputs(n, seed=1)
    x_ref, x, x0 = torch.from_numpy(x_T), jnp.asarray(x_T), jnp.zeros(x_T.shape)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(torch.from_numpy(outputs[i]), t, x_ref).prev_sample
        x, x0 = _dpm(schedule, x, plan.t[i], plan.t_prev[i], outputs[i], x0, plan.t_last[i],
                     bool(plan.second_order[i]), ptype=ptype, one=one)  # fmt: skip
        _assert_close_rel(x, x_ref.numpy())


# ------------------------------------------------------------------------------------- known answer (Gaussian)

MU = np.array([1.0, -0.5, 0.3, 2.0], np.float32)
SIG = np.array([0.8, 1.0, 1.5, 2.0], np.float32)


def _exact_prediction(schedule, ptype, x, t):
    """The Bayes-optimal output for data N(MU, SIG^2) under the VP forward process."""
    alpha, sigma = S.signal_noise_scales(schedule, t)
    alpha, sigma = alpha[:, None], sigma[:, None]
    eps = sigma * (x - alpha * MU) / (alpha**2 * SIG**2 + sigma**2)
    if ptype == "eps":
        return eps
    x0 = (x - sigma * eps) / alpha
    return x0 if ptype == "x0" else alpha * eps - sigma * x0


def _ddim_gain(abar, ts, final_abar):
    """Closed form of deterministic DDIM on Gaussian data: each step scales x - sqrt(abar) mu by
    (a' a s^2 + s' s) / (a^2 s^2 + s^2_noise) (float64, from the DDIM update and the exact predictor)."""
    gain = np.ones_like(SIG, np.float64)
    levels = [abar[t] for t in ts] + [final_abar]
    for ab, ab_next in zip(levels[:-1], levels[1:]):
        a, s, a2, s2 = np.sqrt(ab), np.sqrt(1 - ab), np.sqrt(ab_next), np.sqrt(1 - ab_next)
        gain *= (a2 * a * SIG**2 + s2 * s) / (a**2 * SIG**2 + s**2)
    return gain


@pytest.mark.parametrize("sampler,num_steps", [("ddim", 100), ("dpmpp_2m", 50)])
@pytest.mark.parametrize("ptype", ["eps", "v", "x0"])
def test_gaussian_known_answer(sampler, num_steps, ptype):
    """Starting from the exact marginal q(x_T), deterministic samplers with the exact predictor should
    return N(mu, sigma^2) (up to the final level abar_0 and the solver's discretisation error)."""
    schedule, batch = S.make_schedule(), 8192
    model_fn = lambda x, t, text, image: _exact_prediction(schedule, ptype, x, t)  # noqa: E731
    ts = (SM.ddim_timesteps if sampler == "ddim" else SM.dpmsolver_timesteps)(num_steps)
    abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    a_T, s_T, a_f = np.sqrt(abar[ts[0]]), np.sqrt(1 - abar[ts[0]]), np.sqrt(abar[0])
    z = np.random.default_rng(7).standard_normal((batch, 4))
    x_T = a_T * MU + np.sqrt(a_T**2 * SIG**2 + s_T**2) * z  # exact marginal q(x_T)
    out = SM.sample(
        model_fn, schedule, jnp.asarray(x_T, jnp.float32), text_emb=jnp.zeros((batch, 1, 1)),
        null_text_emb=jnp.zeros((1, 1)), image=jnp.zeros((batch, 1)), image_scale=1.5, text_scale=4.0,
        sampler=sampler, num_steps=num_steps, prediction_type=ptype, loop="scan",
    )  # fmt: skip
    out = np.asarray(out, np.float64)
    assert np.all(np.isfinite(out))
    if sampler == "ddim":  # exact answer of the discretised sampler, to float32 precision
        expected = a_f * MU + _ddim_gain(abar, ts, abar[0]) * (x_T - a_T * MU)
        np.testing.assert_allclose(out, expected, atol=2e-4 * SIG.max())
    # The statistics of the samples: the data's mean and variance within a few % (sampling s.e. of the
    # mean is 0.011 sigma, of the variance 1.6%).
    mean_err, var_ratio = np.abs(out.mean(0) - MU) / SIG, out.var(0) / SIG**2
    assert np.all(mean_err < 0.04) and np.all(np.abs(var_ratio - 1) < 0.06), (mean_err, var_ratio)
    # Sampling noise removed: against the exact probability flow applied to the same x_T, only the solver's
    # discretisation error remains (it keeps the mean and scales the spread by a few %).
    gain = np.sqrt(a_f**2 * SIG**2 + 1 - abar[0]) / np.sqrt(a_T**2 * SIG**2 + s_T**2)
    exact_flow = a_f * MU + gain * (x_T - a_T * MU)
    mean_err = np.abs(out.mean(0) - exact_flow.mean(0)) / SIG
    var_ratio = out.var(0) / exact_flow.var(0)
    assert np.all(mean_err < 0.002) and np.all(np.abs(var_ratio - 1) < 0.05), (mean_err, var_ratio)


# ------------------------------------------------------------------------------------------------ guidance


def _toy_model(x, t, text, image):
    """Row-wise toy model whose output depends on x, t, text and image (no mixing across the batch)."""
    tt = (t.astype(jnp.float32) / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    txt = jnp.tanh(text.sum(axis=(1, 2))).reshape(tt.shape)
    return jnp.sin(x * (1.0 + tt)) + 0.3 * txt + 0.5 * jnp.cos(image) * x


def _toy_inputs(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 2, 4, 4, 3)).astype(np.float32)
    text = rng.standard_normal((batch, 5, 6)).astype(np.float32)
    null = rng.standard_normal((5, 6)).astype(np.float32)
    image = rng.standard_normal((batch, 2, 4, 4, 3)).astype(np.float32)
    return x, text, null, image


@jax.jit
def _guidance_branches(x, t, text, null, image, s_i, s_t):
    out3 = _toy_model(*SM.guidance_inputs(x, t, text, null, image))
    u, i, f = SM.split_guidance_output(out3)
    null_b = jnp.broadcast_to(null, text.shape)
    refs = (
        _toy_model(x, t, null_b, jnp.zeros_like(image)),
        _toy_model(x, t, null_b, image),
        _toy_model(x, t, text, image),
    )
    return (u, i, f), refs, SM.double_guidance(u, i, f, s_i, s_t), SM.double_guidance(u, i, f, 1.0, 1.0)


def test_double_guidance_equals_three_separate_calls():
    x, text, null, image = _toy_inputs(3)
    t = jnp.array([981, 500, 1])
    s_i, s_t = 1.7, 6.0
    batched, (u_ref, i_ref, f_ref), guided, guided_ones = _guidance_branches(x, t, text, null, image, s_i, s_t)
    for a, b in zip(batched, (u_ref, i_ref, f_ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(guided, u_ref + s_i * (i_ref - u_ref) + s_t * (f_ref - i_ref), atol=1e-5)
    np.testing.assert_allclose(guided_ones, f_ref, atol=1e-6)
    # Sample-major layout: rows 3b..3b+2 belong to sample b.
    x3, t3, text3, image3 = jax.jit(SM.guidance_inputs)(x, t, text, null, image)
    np.testing.assert_array_equal(t3, [981, 981, 981, 500, 500, 500, 1, 1, 1])
    np.testing.assert_array_equal(x3[3:6], np.stack([x[1]] * 3))
    np.testing.assert_array_equal(text3[3:6], np.stack([null, null, text[1]]))
    np.testing.assert_array_equal(image3[3:6], np.stack([np.zeros_like(image[1]), image[1], image[1]]))


def _run(loop="python", sampler="ddim", eta=0.7, key=None, x=None, scales=(1.5, 5.0), batch=4, **kw):
    x0, text, null, image = _toy_inputs(batch)
    x = x0 if x is None else x
    return SM.sample(
        _toy_model, S.make_schedule(), x, text_emb=kw.pop("text", text), null_text_emb=null,
        image=kw.pop("image", image), image_scale=scales[0], text_scale=scales[1], sampler=sampler,
        num_steps=kw.pop("num_steps", 8), eta=eta, key=jax.random.key(0) if key is None else key, loop=loop, **kw,
    )  # fmt: skip


def test_same_key_same_sample_and_python_loop_equals_scan():
    a = _run(key=jax.random.key(3))
    b = _run(key=jax.random.key(3))
    c = _run(key=jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3
    np.testing.assert_allclose(_run(loop="scan", key=jax.random.key(3)), a, atol=1e-5)
    for sampler in ("ddim", "dpmpp_2m"):
        eta = 0.0
        np.testing.assert_allclose(
            _run(loop="scan", sampler=sampler, eta=eta), _run(sampler=sampler, eta=eta), atol=1e-5
        )


def test_each_sample_equals_its_solo_run():
    key, batch = jax.random.key(11), 4
    x, text, _, image = _toy_inputs(batch)
    full = _run(key=key, batch=batch)
    keys = SM.per_sample_keys(key, batch)
    for b in range(batch):
        solo = _run(key=keys[b : b + 1], x=x[b : b + 1], text=text[b : b + 1], image=image[b : b + 1], batch=batch)
        np.testing.assert_allclose(solo[0], full[b], atol=1e-5)
    # The initial noise is per sample too.
    np.testing.assert_array_equal(SM.initial_noise(key, (3, 4))[1], SM.initial_noise(keys[1:2], (1, 4))[0])


def test_sharded_batch_equals_unsharded():
    devices = np.array(jax.devices()[:4])
    mesh = jax.sharding.Mesh(devices, ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x, text, _, image = _toy_inputs(4)
    ref = _run(batch=4)
    put = lambda a: jax.device_put(a, sharding)  # noqa: E731
    got = _run(batch=4, x=put(x), text=put(text), image=put(image))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_changing_knobs_does_not_recompile():
    calls = []

    def counting_model(x, t, text, image):
        calls.append(1)  # runs only while tracing
        return _toy_model(x, t, text, image)

    model = jax.tree_util.Partial(counting_model)
    x, text, null, image = _toy_inputs()
    schedule = S.make_schedule()
    progress = []

    def run(scales, eta, key, num_steps=6):
        return SM.sample(
            model, schedule, x, text_emb=text, null_text_emb=null, image=image, image_scale=scales[0],
            text_scale=scales[1], eta=eta, key=key, num_steps=num_steps,
            callback=lambda i, t, state: progress.append((i, t)),
        )  # fmt: skip

    run((1.5, 5.0), 0.0, jax.random.key(0))
    size, traced = SM.guided_step._cache_size(), len(calls)
    assert progress == list(enumerate(SM.ddim_timesteps(6).tolist()))
    run((1.0, 9.0), 1.0, jax.random.key(5))
    run((2.0, 3.0), 0.5, jax.random.key(6), num_steps=10)
    assert SM.guided_step._cache_size() == size
    assert len(calls) == traced == 1
