"""Rematerialisation (gradient checkpointing) of Flax modules that also saves memory on XLA:CPU.

`remat(cls, policy)` returns a module class computing the same thing as `cls` whose backward pass recomputes
the module's forward instead of keeping its intermediates:

* `policy="nothing_saveable"` (the default of `config.model.remat_policy`): `checkpoint_after_grad` below. Only
  the module's inputs are kept; the recomputation is a `jax.custom_vjp` backward that runs on the inputs tied to
  the incoming cotangent (`x + 0 * c`, exact: `c` is 0 or 1 computed from the cotangent). That data dependency
  makes the recomputation a different value from the forward's for every compiler pass and schedules it after
  the cotangent exists. `jax.checkpoint` relies on `optimization_barrier` for both, which XLA:CPU removes before
  its late CSE and its memory scheduler: there, the recompute was merged back into the forward (CSE) or hoisted
  next to it, and `nn.remat` saved no memory at all (WORKSPACE.md, benchmark section).
* any other name of `jax.checkpoint_policies` (e.g. `dots_with_no_batch_dims_saveable`): `flax.linen.remat` with
  that policy (effective on TPU/GPU, where the barrier survives; on XLA:CPU it saves little or nothing).

Parameters, their names, RNG streams (dropout masks) and the numerics of the forward are those of `cls`; the
gradients equal the non-remat ones up to float reassociation (tests/test_remat.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import lift

GATED_POLICY = "nothing_saveable"


def _opaque_zero(ct) -> jax.Array:
    """0.0 that depends on the cotangent `ct` and that no compiler pass can fold to a constant."""
    leaves = [x for x in jax.tree_util.tree_leaves(ct) if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
    if not leaves:
        return jnp.zeros((), jnp.float32)
    first = leaves[0].reshape(-1)[0]
    return jnp.isfinite(first).astype(jnp.float32) * 0.0


def _gated_checkpoint_call(f: Callable, tie: tuple[bool, ...], *leaves):
    """`f(*leaves)` whose VJP recomputes `f` on the leaves marked in `tie` made to depend on the cotangent."""

    @jax.custom_vjp
    def call(*xs):
        return f(*xs)

    def fwd(*xs):
        return f(*xs), xs

    def bwd(xs, ct):
        zero = _opaque_zero(ct)
        xs = tuple(x + zero.astype(x.dtype) if t else x for x, t in zip(xs, tie))
        _, vjp = jax.vjp(f, *xs)
        return vjp(ct)

    call.defvjp(fwd, bwd)
    return call(*leaves)


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def checkpoint_after_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Lifted (`flax.core.lift`) checkpoint of `fn(scope, *args)`: see the module docstring.

    `fn` is traced once (as `jax.checkpoint` does), so parameter creation and RNG counters behave as without
    remat; the forward and the backward's recomputation both evaluate that one trace.
    """

    def inner(scope_fn, repack_fn, variable_groups, rng_groups, *args):
        def run(variable_groups, rng_groups, *args):
            scope = scope_fn(variable_groups, rng_groups)
            y = fn(scope, *args)
            return y, repack_fn(scope)

        converted, consts = jax.closure_convert(run, variable_groups, rng_groups, *args)
        state_leaves, state_tree = jax.tree_util.tree_flatten((variable_groups, rng_groups))
        arg_leaves, arg_tree = jax.tree_util.tree_flatten(args)
        n_state, n_args = len(state_leaves), len(arg_leaves)

        def flat(*leaves):
            vg, rg = jax.tree_util.tree_unflatten(state_tree, leaves[:n_state])
            a = jax.tree_util.tree_unflatten(arg_tree, leaves[n_state:n_state + n_args])
            return converted(vg, rg, *a, *leaves[n_state + n_args:])

        # Tie the activations (module inputs), not the parameters/RNGs/hoisted constants: every recomputed
        # value that depends on an input then differs from its forward twin.
        tie = (False,) * n_state + tuple(_is_float(x) for x in arg_leaves) + (False,) * len(consts)
        return _gated_checkpoint_call(flat, tie, *state_leaves, *arg_leaves, *consts)

    return lift.pack(inner, (True,), (True,), (True,), name="remat")


@functools.lru_cache(maxsize=None)
def remat(cls, policy: Optional[str]):
    """`cls` rematerialised with the named policy (see the module docstring); `cls` itself when None."""
    if policy is None:
        return cls
    if policy == GATED_POLICY:
        return nn.transforms.lift_transform(checkpoint_after_grad, cls)
    fn = getattr(jax.checkpoint_policies, policy, None)
    if fn is None or not callable(fn) or policy.startswith("_"):
        raise ValueError(f"unknown remat_policy {policy!r}; use a name of jax.checkpoint_policies such as "
                         f"'nothing_saveable' (the default) or 'dots_with_no_batch_dims_saveable'")
    return nn.remat(cls, policy=fn)


__all__ = ["remat", "checkpoint_after_grad", "GATED_POLICY"]
