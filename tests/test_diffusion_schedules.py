"""Noise schedules and target conversions against diffusers (the reference oracle)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import jax
import jax.numpy as jnp

from dreamvideo_jax.diffusion import schedules as S


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("rescale", [False, True])
def test_alphas_cumprod_match_diffusers(kind, rescale):
    ours = S.make_schedule(kind, 1000, 0.00085, 0.012, rescale_zero_terminal_snr=rescale)
    for cls in (DDPMScheduler, DDIMScheduler):
        ref = cls(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule=kind,
            rescale_betas_zero_snr=rescale,
        )
        # diffusers accumulates the product in float32; ours is float64 rounded once.
        np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=2e-5, atol=1e-6)
    assert ours.alphas_cumprod.dtype == jnp.float32
    np.testing.assert_allclose(ours.sqrt_alphas_cumprod**2, ours.alphas_cumprod, rtol=1e-6, atol=1e-7)
    if rescale:
        assert float(ours.alphas_cumprod[-1]) == 0.0


def test_modelscope_schedule_values():
    s = S.make_schedule()  # ModelScope: linear_sd 0.00085 -> 0.012
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
    assert s.num_train_timesteps == 1000


def test_schedule_is_a_pytree_and_unknown_kind_fails():
    s = S.make_schedule()
    leaves = jax.tree_util.tree_leaves(s)
    assert len(leaves) == 4 and all(leaf.shape == (1000,) for leaf in leaves)
    with pytest.raises(ValueError, match="Unknown schedule kind"):
        S.make_schedule("cosine")
    with pytest.raises(ValueError, match="Unknown prediction_type"):
        S.canonical_prediction_type("noise")


def test_add_noise_and_velocity_match_diffusers_on_video_shapes():
    s = S.make_schedule()
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 2, 4, 4, 3)).astype(np.float32)  # (B, F, h, w, C)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 500, 999], np.int32)
    ours = S.add_noise(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    theirs = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t).long())
    np.testing.assert_allclose(ours, theirs.numpy(), atol=2e-6)
    ours_v = S.velocity(s, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    theirs_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t).long())
    np.testing.assert_allclose(ours_v, theirs_v.numpy(), atol=2e-6)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0", "epsilon", "v_prediction", "sample"])
def test_target_round_trip(prediction_type):
    """to_x0_eps inverts training_target: the exact target yields the true (x0, noise)."""
    s = S.make_schedule()
    key0, key1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(key0, (4, 2, 3, 3, 2))
    noise = jax.random.normal(key1, x0.shape)
    t = jnp.array([1, 100, 600, 990])
    x_t = S.add_noise(s, x0, noise, t)
    target = S.training_target(s, x0, noise, t, prediction_type)
    x0_hat, eps_hat = jax.jit(S.to_x0_eps, static_argnums=4)(s, x_t, t, target, prediction_type)
    # eps -> x0 divides by sqrt(abar), which is 0.07 at t=990: allow for that amplification of rounding.
    np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
    np.testing.assert_allclose(eps_hat, noise, atol=2e-4)
