"""Remat (config.model.remat): same parameters, outputs, gradients and dropout masks as without it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dreamvideo_jax.models import build
from dreamvideo_jax.models.remat import remat


def _model_config(remat_on, policy="nothing_saveable"):
    m = tiny.get_config().model
    m.remat = remat_on
    m.remat_policy = policy
    return m


def _inputs(m, b=1, f=3, h=4, w=4, seed=0):
    rng = np.random.RandomState(seed)
    factor = build.autoencoder_factor(m)
    return (rng.randn(b, f, h, w, build.latent_channels(m)).astype(np.float32), rng.randint(0, 1000, (b,)),
            rng.randn(b, 77, m.text.width).astype(np.float32),
            rng.uniform(-1, 1, (b, h * factor, w * factor, 3)).astype(np.float32))


def _perturbed_params(m):
    # Zero-initialised layers block gradients at init (by design): perturb so that every path carries signal.
    p = nn.meta.unbox(build.init_dreamvideo(m, jax.random.key(0))["params"])
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_remat_matches_no_remat():
    base, rm = _model_config(False), _model_config(True)
    params = _perturbed_params(base)
    # Same parameter tree (names, shapes) and the same initial values.
    init_r = nn.meta.unbox(build.init_dreamvideo(rm, jax.random.key(0))["params"])
    init_b = nn.meta.unbox(build.init_dreamvideo(base, jax.random.key(0))["params"])
    assert jax.tree.structure(init_r) == jax.tree.structure(init_b)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), init_r, init_b)

    x, t, c, img = _inputs(base)
    drop = jax.random.key(7)

    def loss_and_grad(m, train):
        model = build.build_dreamvideo(m)

        def loss(p):
            out = model.apply({"params": p}, x, t, c, img, train=train, rngs={"dropout": drop})
            return jnp.mean(out ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    # train=True: dropout in the temporal convs, which the backward must recompute with the same masks.
    (lb, gb), (lr, gr) = loss_and_grad(base, True), loss_and_grad(rm, True)
    np.testing.assert_allclose(lr, lb, rtol=1e-6)
    gmax = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(gb))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * gmax), gr, gb)


def test_remat_policies_on_a_small_module():
    """Both implementations (gated `nothing_saveable`, `jax.checkpoint` for other policies) give the module's
    output and gradients; the gated one really recomputes (XLA:CPU keeps more FLOPs than without remat), and
    an unknown policy name is refused with the choices."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(jnp.tanh(nn.Dense(64)(x)))

    x = jnp.linspace(-1, 1, 32).reshape(8, 4)
    v = MLP().init(jax.random.key(0), x)
    ref_out, ref_grad, ref_flops = None, None, None
    for cls in (MLP, remat(MLP, "nothing_saveable"), remat(MLP, "dots_with_no_batch_dims_saveable")):
        assert jax.tree.structure(cls().init(jax.random.key(0), x)) == jax.tree.structure(v)
        out = cls().apply(v, x)
        step = jax.jit(jax.grad(lambda p: jnp.sum(cls().apply(p, x) ** 2))).lower(v).compile()
        grad = step(v)
        ca = step.cost_analysis()
        flops = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
        if ref_out is None:
            ref_out, ref_grad, ref_flops = out, grad, flops
            continue
        np.testing.assert_array_equal(out, ref_out)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grad, ref_grad)
        if cls is remat(MLP, "nothing_saveable"):
            assert flops > ref_flops
    with pytest.raises(ValueError, match="nothing_saveable"):
        remat(MLP, "no_such_policy")
