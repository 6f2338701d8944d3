"""Shared by the training tests: the tiny training config, a structured batch, 1- and 8-device trainers, and
the module-scoped switch to `jax_disable_most_optimizations` (compilation dominates the cost on CPU)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from configs import tiny
from dreamvideo_jax.parallel import mesh as mesh_lib
from dreamvideo_jax.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, EVERY = 6, 3


def train_config(data_dir: str = ""):
    """configs/tiny.py with a short constant-lr schedule (the overfitting test shares this compiled step)."""
    c = tiny.get_config()
    t = c.train
    t.num_steps, t.checkpoint_every, t.log_every = NUM_STEPS, EVERY, 1
    t.learning_rate, t.warmup_steps, t.lr_schedule = 1e-2, 0, "constant"
    # Adam's first steps are sign descent: with eps=1e-8 a gradient element within float noise of zero moves
    # by +-lr on one mesh and -+lr on another. A larger eps keeps updates Lipschitz in the gradients, so
    # 1-vs-8-device results agree to float noise.
    t.adam_eps = 1e-4
    t.progress_bar = False
    if data_dir:
        c.data.data_dir = data_dir
    return c


def cli_overrides(data_dir: str | None) -> list[str]:
    """`train_config` as `--config.*` flags over configs/tiny.py (without the data dir when None)."""
    return [f"--config.train.num_steps={NUM_STEPS}", f"--config.train.checkpoint_every={EVERY}",
            "--config.train.log_every=1", "--config.train.learning_rate=0.01", "--config.train.warmup_steps=0",
            "--config.train.lr_schedule=constant", "--config.train.adam_eps=1e-4", "--config.train.progress_bar=False",
            ] + ([f"--config.data.data_dir={data_dir}"] if data_dir is not None else [])


def make_batch(seed: int = 0, b: int = 8) -> dict:
    """A structured fixed batch: a bright square moving one pixel per frame on a flat background."""
    rng = np.random.default_rng(seed)
    v = np.full((b, 4, 16, 16, 3), -0.5, np.float32)
    for i in range(b):
        for f in range(4):
            v[i, f, 4 + f : 9 + f, 3 + i % 6 : 8 + i % 6, i % 3] = 0.8
    return {"video": v, "image": v[:, 0], "tokens": rng.integers(0, 49408, (b, 77)).astype(np.int32)}


@pytest.fixture(scope="module")
def one():
    """1-device trainer, its initial params and a fresh state's trainable copy."""
    tr = Trainer(train_config(), mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    params = tr.init_params(jax.random.key(0))
    return tr, params


@pytest.fixture(scope="module")
def eight():
    tr = Trainer(train_config(), mesh_lib.make_mesh({"data": 2, "fsdp": 4, "tensor": 1}))
    params = tr.init_params(jax.random.key(0))
    return tr, params
