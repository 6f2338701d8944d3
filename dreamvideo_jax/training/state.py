"""Optimizer and train state.

`TrainState.params` holds the trainable parameters only (`System.split`: the system's layout restricted to the
leaves matched by `train.trainable`); only they enter the optimizer state and the EMA.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dreamvideo_jax.parallel import sharding

# ----------------------------------------------------------------------------------------------------------------
# Optimizer


def make_lr_schedule(t) -> optax.Schedule:
    lr, warm, total = float(t.learning_rate), int(t.warmup_steps), int(t.num_steps)
    decay_steps = max(1, total - warm)
    if t.lr_schedule == "constant":
        after = optax.constant_schedule(lr)
    elif t.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(t.min_lr_ratio))
    else:
        after = optax.linear_schedule(lr, lr * float(t.min_lr_ratio), decay_steps)
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def _decay_mask(params):
    return jax.tree.map(lambda p: np.ndim(p) >= 2, params)


def make_optimizer(t) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = make_lr_schedule(t)
    parts = []
    if float(t.grad_clip_norm) > 0:
        parts.append(optax.clip_by_global_norm(float(t.grad_clip_norm)))
    parts.append(optax.adamw(lr, b1=float(t.adam_b1), b2=float(t.adam_b2), eps=float(t.adam_eps),
                             weight_decay=float(t.weight_decay), mask=_decay_mask))
    return optax.chain(*parts), lr


# ----------------------------------------------------------------------------------------------------------------
# Train state


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # trainable params only
    opt_state: Any
    ema: Any  # EMA of `params`
    rng: jax.Array  # uint32 key data of the base key; step keys are fold_in(key, step)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    key = jax.random.key(seed)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, params),
        rng=jax.random.key_data(jax.random.fold_in(key, 0x7A1)),
    )


def state_shardings(abstract_state: TrainState, param_shardings: Any, tx, mesh) -> TrainState:
    """Shardings of a TrainState: param-shaped optimizer leaves follow the params, the rest is replicated."""
    rep = sharding.replicated(mesh)
    opt = optax.tree_map_params(
        tx, lambda _, s: s, abstract_state.opt_state, param_shardings,
        transform_non_params=lambda _: rep,
    )
    return TrainState(step=rep, params=param_shardings, opt_state=opt, ema=param_shardings, rng=rep)
