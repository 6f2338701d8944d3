"""Training objective: timesteps, IP2P condition dropout, weighted loss, loss buckets."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dreamvideo_jax.diffusion import objective as O
from dreamvideo_jax.diffusion import schedules as S


def test_sample_timesteps_range_and_dtype():
    t = jax.jit(O.sample_timesteps, static_argnums=(1, 2))(jax.random.key(1), 4096, 1000)
    assert t.shape == (4096,) and t.dtype == jnp.int32
    assert int(t.min()) >= 0 and int(t.max()) <= 999
    assert int(t.min()) < 10 and int(t.max()) > 990


def test_sample_timesteps_high_noise_share():
    n, T, start, frac = 20000, 1000, 900, 0.5
    draw = jax.jit(O.sample_timesteps, static_argnums=(1, 2, 3, 4))
    t = np.asarray(draw(jax.random.key(2), n, T, frac, start))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
    # P(t >= start) = frac + (1 - frac) * (T - start) / T = 0.55; below start the density stays uniform.
    assert abs(np.mean(t >= start) - 0.55) < 0.015
    low = t[t < start]
    assert abs(np.mean(low < start // 2) - 0.5) < 0.02
    # The default draws exactly what plain uniform sampling draws (runs keep their timesteps).
    np.testing.assert_array_equal(np.asarray(draw(jax.random.key(2), n, T, 0.0, start)),
                                  np.asarray(jax.random.randint(jax.random.key(2), (n,), 0, T, dtype=jnp.int32)))
    with pytest.raises(ValueError, match="high_fraction=1.5"):
        O.sample_timesteps(jax.random.key(0), 4, T, 1.5, start)
    with pytest.raises(ValueError, match="high_start=1000"):
        O.sample_timesteps(jax.random.key(0), 4, T, 0.5, 1000)


def test_condition_dropout_follows_instruct_pix2pix():
    batch, p = 20000, 0.1
    text = jnp.ones((batch, 3, 2))
    null = jnp.full((3, 2), -7.0)
    image = jnp.ones((batch, 2, 4, 4, 3))
    text_out, image_out, masks = jax.jit(O.condition_dropout)(jax.random.key(0), text, null, image, p)
    td, idr = np.asarray(masks.text_dropped), np.asarray(masks.image_dropped)
    # p text-only, p both, p image-only, 1 - 3p neither (binomial s.e. ~0.002).
    for frac, want in [
        (np.mean(td & ~idr), p),
        (np.mean(td & idr), p),
        (np.mean(~td & idr), p),
        (np.mean(~td & ~idr), 1 - 3 * p),
    ]:
        assert abs(frac - want) < 0.01, (frac, want)
    text_out, image_out = np.asarray(text_out), np.asarray(image_out)
    np.testing.assert_array_equal(text_out[td], -7.0)
    np.testing.assert_array_equal(text_out[~td], 1.0)
    np.testing.assert_array_equal(image_out[idr], 0.0)
    np.testing.assert_array_equal(image_out[~idr], 1.0)
    # (1, L, D) null embeddings are accepted too; p = 0 drops nothing.
    _, _, m0 = O.condition_dropout(jax.random.key(0), text[:64], null[None], image[:64], 0.0)
    assert not bool(m0.text_dropped.any() | m0.image_dropped.any())


def test_diffusion_loss_plain_and_min_snr():
    s = S.make_schedule()
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((4, 2, 3, 3, 2)).astype(np.float32)
    target = rng.standard_normal(pred.shape).astype(np.float32)
    t = np.array([0, 10, 400, 999], np.int32)
    mse = ((pred - target) ** 2).reshape(4, -1).mean(1)

    assert O.diffusion_loss(jnp.asarray(pred, jnp.bfloat16), target, t).loss.dtype == jnp.float32
    out = O.diffusion_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(t))
    np.testing.assert_allclose(out.per_sample_mse, mse, rtol=1e-6)
    np.testing.assert_allclose(out.loss, mse.mean(), rtol=1e-6)

    abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)[t]
    snr = abar / (1 - abar)
    clipped = np.minimum(snr, 5.0)
    expected = {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}  # diffusers' examples
    fn = jax.jit(O.diffusion_loss, static_argnames=("prediction_type", "loss_weighting"))
    for ptype, w in expected.items():
        out = fn(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(t), schedule=s, prediction_type=ptype,
                 loss_weighting="min_snr_gamma", snr_gamma=5.0)  # fmt: skip
        np.testing.assert_allclose(out.weights, w, rtol=1e-4)
        np.testing.assert_allclose(out.per_sample_loss, w * mse, rtol=1e-4)
        np.testing.assert_allclose(out.loss, (w * mse).mean(), rtol=1e-4)
    with pytest.raises(ValueError, match="schedule"):
        O.diffusion_loss(pred, target, t, loss_weighting="min_snr_gamma")


def test_min_snr_eps_weight_is_finite_at_zero_terminal_snr():
    s = S.make_schedule(rescale_zero_terminal_snr=True)
    w = O.loss_weights(s, jnp.array([999, 0]), "eps", "min_snr_gamma", 5.0)
    assert np.all(np.isfinite(w)) and float(w[0]) == 1.0


def test_timestep_buckets():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 1000, 257).astype(np.int32)
    loss = rng.random(257).astype(np.float32)
    sums, counts = jax.jit(O.timestep_buckets, static_argnums=(2, 3))(jnp.asarray(t), jnp.asarray(loss), 10, 1000)
    assert sums.shape == counts.shape == (10,)
    np.testing.assert_allclose(counts, np.bincount(t // 100, minlength=10))
    np.testing.assert_allclose(sums, np.bincount(t // 100, weights=loss, minlength=10), rtol=1e-5)
