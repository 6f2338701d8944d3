"""The attention kernel with a hand-written backward: same values and gradients as torch's SDPA and as autodiff of
`jax.nn.dot_product_attention`, causal and cross-attention shapes, and errors that name the shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamvideo_jax.models.attention import dot_product_attention

torch = pytest.importorskip("torch")

# (B, T, S, N, H): self-attention, cross-attention to a short context, temporal attention (many short sequences)
SHAPES = [(2, 40, 40, 2, 8), (3, 24, 7, 4, 8), (16, 5, 5, 1, 16)]


def _inputs(b, t, s, n, h, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    q, kk, v = (jax.random.normal(k[0], (b, t, n, h)) * 2, jax.random.normal(k[1], (b, s, n, h)) * 2,
                jax.random.normal(k[2], (b, s, n, h)))
    return q, kk, v, jax.random.normal(k[3], (b, t, n, h))


def _close(ours, ref, rel=1e-5):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err, tol = np.abs(ours - ref).max(), rel * np.abs(ref).max() + 1e-6
    assert err <= tol, f"max|diff| {err:.3g} > tol {tol:.3g}"


# causal attention is square: the self-attention shapes only
@pytest.mark.parametrize("shape,causal", [(x, c) for x in SHAPES for c in (False, True) if not c or x[1] == x[2]])
def test_values_and_gradients_match_torch_sdpa(shape, causal):
    q, k, v, w = _inputs(*shape)
    loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, is_causal=causal) * w)
    out = dot_product_attention(q, k, v, is_causal=causal)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    tq, tk, tv = (torch.tensor(np.asarray(x)).permute(0, 2, 1, 3).double().requires_grad_() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    (ref * torch.tensor(np.asarray(w)).permute(0, 2, 1, 3).double()).sum().backward()
    back = lambda x: x.detach().permute(0, 2, 1, 3).numpy()
    _close(out, back(ref))
    for ours, t in zip(grads, (tq, tk, tv)):
        _close(ours, back(t.grad))


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_gradients_match_autodiff_of_jax_reference_under_jit(shape):
    q, k, v, w = _inputs(*shape, seed=1)
    ours = jax.jit(jax.grad(lambda *a: jnp.sum(dot_product_attention(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        _close(a, b, rel=1e-5)


def test_bfloat16_in_bfloat16_out_with_float32_softmax():
    q, k, v, w = _inputs(*SHAPES[0])
    lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = dot_product_attention(*lo)
    grads = jax.grad(lambda *a: jnp.sum(dot_product_attention(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(*lo)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    _close(out.astype(jnp.float32), dot_product_attention(*(x.astype(jnp.float32) for x in lo)), rel=2e-2)


def test_bad_shapes_name_them():
    q, k, v, _ = _inputs(*SHAPES[1])
    with pytest.raises(ValueError, match=r"q \(3, 24, 4, 8\), k \(3, 7, 4, 8\), v \(3, 6, 4, 8\)"):
        dot_product_attention(q, k, v[:, :6])
    with pytest.raises(ValueError, match="causal attention needs T == S"):
        dot_product_attention(q, k, v, is_causal=True)
