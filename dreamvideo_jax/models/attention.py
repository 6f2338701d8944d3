"""Scaled dot-product attention with a hand-written backward.

`jax.nn.dot_product_attention` (its XLA implementation) differentiates the softmax op by op: the backward makes
several passes over the `(B, N, T, S)` probabilities, divides by the row sums again and reduces over the whole
matrix. On XLA:CPU that made the 32×32-latent self-attention the largest cost of the bench train step
(WORKSPACE.md, Benchmarks). Here the backward is the closed form the fused GPU kernels use:

    dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),  dQ = dS K · scale,  dK = dSᵀ Q · scale

with `P` saved from the forward (autodiff of the reference saves a matrix of the same size). Logits and
probabilities are float32 whatever the input dtype; outputs and gradients come back in the input dtype.
Layout as `jax.nn.dot_product_attention`: `(B, T, N, H)` queries, `(B, S, N, H)` keys and values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_f32 = jnp.float32


def _probabilities(q, k, is_causal: bool):
    # Scale the queries, not the logits: XLA:CPU would materialise the scalar as a (B, N, T, S) operand.
    q = q.astype(_f32) * q.shape[-1] ** -0.5
    s = jnp.einsum("btnh,bsnh->bnts", q, k.astype(_f32))
    if is_causal:
        t, s_len = s.shape[-2:]
        s = jnp.where(jnp.tril(jnp.ones((t, s_len), bool)), s, jnp.finfo(_f32).min)
    return jax.nn.softmax(s, axis=-1)


def _output(p, v):
    return jnp.einsum("bnts,bsnh->btnh", p, v.astype(_f32)).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, is_causal):
    return _attention_fwd(q, k, v, is_causal)[0]  # under jit the unused residuals cost nothing


def _attention_fwd(q, k, v, is_causal):
    p = _probabilities(q, k, is_causal)
    o = _output(p, v)
    return o, (q, k, v, o, p)


def _attention_bwd(is_causal, res, do):
    del is_causal  # the saved probabilities are already zero above the diagonal
    q, k, v, o, p = res
    scale = q.shape[-1] ** -0.5
    do32 = do.astype(_f32)
    dv = jnp.einsum("bnts,btnh->bsnh", p, do32)
    dp = jnp.einsum("btnh,bsnh->bnts", do32, v.astype(_f32))
    # rowsum(dO ∘ O) as a reduction: written as an einsum, XLA:CPU made it a batched dot with a unit output
    # dimension that took more time than any of the backward's four matmuls.
    row = jnp.swapaxes(jnp.sum(do32 * o.astype(_f32), axis=-1), 1, 2)[..., None]
    ds = p * (dp - row)
    dq = jnp.einsum("bnts,bsnh->btnh", ds, k.astype(_f32) * scale)
    dk = jnp.einsum("bnts,btnh->bsnh", ds, q.astype(_f32) * scale)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention(q, k, v, is_causal: bool = False):
    """softmax(Q Kᵀ / sqrt(H)) V per head; `(B, T, N, H)`, `(B, S, N, H)`, `(B, S, N, H)` -> `(B, T, N, H)`."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"dot_product_attention: expected q (B,T,N,H) and k, v (B,S,N,H) with the same B, N, H; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if is_causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"dot_product_attention: causal attention needs T == S; got q {q.shape}, k {k.shape}")
    return _attention(q, k, v, bool(is_causal))
