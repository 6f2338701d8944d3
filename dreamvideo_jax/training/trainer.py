"""A config's model, mesh, shardings and compiled train step, without any I/O.

`Trainer` is what the loop and tests drive:

  tr = Trainer(config)                              # mesh from config.mesh over all devices
  params = tr.init_params(jax.random.key(seed))     # shape-first sharded init of every parameter
  trainable, frozen = tr.split(params)
  state = tr.init_state(trainable)
  state, metrics = tr.train_step(state, frozen, tr.global_batch(local_numpy_batch))
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from dreamvideo_jax.models.retention import init_retention_from_unet
from dreamvideo_jax.parallel import mesh as mesh_lib
from dreamvideo_jax.parallel import sharding as sh
from dreamvideo_jax.training import state as st
from dreamvideo_jax.training import step as step_lib


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Trainer:
    def __init__(self, config, mesh: jax.sharding.Mesh | None = None, devices=None):
        self.config = config
        self.comps = st.build_components(config)
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh, devices)
        self.rules = mesh_lib.rules_from_config(config.sharding)
        divisor = mesh_lib.batch_size_divisor(self.mesh)
        if int(config.train.batch_size) % divisor:
            raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by the mesh's "
                             f"data x fsdp = {divisor} devices")
        if int(config.train.batch_size) % jax.process_count():
            raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by the process "
                             f"count {jax.process_count()}")
        fsdp_min = int(config.sharding.get("fsdp_min_size", 0))
        # Boxed abstract trees -> shardings (unboxed trees).
        self.param_shardings = sh.tree_shardings(self.comps.abstract, self.mesh, self.rules, fsdp_min)
        self.abstract_params = sh.unbox(self.comps.abstract)
        self.trainable_shardings, frozen_model_sh = st.split_model(self.param_shardings["model"],
                                                                   self.comps.trainable_paths)
        self.frozen_shardings = {"model": frozen_model_sh, "text_encoder": self.param_shardings["text_encoder"],
                                 "vae": self.param_shardings["vae"]}
        abs_trainable, _ = st.split_model(self.abstract_params["model"], self.comps.trainable_paths)
        self.tx, self.lr_fn = st.make_optimizer(config.train)
        seed = int(config.seed)
        abs_state = jax.eval_shape(lambda p: st.init_state(p, self.tx, seed), abs_trainable)
        self.state_shardings = st.state_shardings(abs_state, self.trainable_shardings, self.tx, self.mesh)
        self.abstract_state = _with_shardings(abs_state, self.state_shardings)
        self.abstract_frozen = _with_shardings(self.split(self.abstract_params)[1], self.frozen_shardings)
        self._step_fn = step_lib.make_train_step(self.comps, self.tx, self.lr_fn)
        self._jit_step = jax.jit(
            self._step_fn,
            in_shardings=(self.state_shardings, self.frozen_shardings, sh.batch_sharding(self.mesh)),
            out_shardings=(self.state_shardings, sh.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        self._compiled = None
        self._init_fn = None
        self._state_fn = None
        self.compile_seconds = None
        self.lower_seconds = None

    # -- parameters ------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.comps.mode

    def with_shardings(self, abstract: Any, shardings: Any) -> Any:
        return _with_shardings(abstract, shardings)

    def abstract_all(self) -> dict:
        """ShapeDtypeStructs (with shardings) of all params {'model', 'text_encoder', 'vae'}."""
        return _with_shardings(self.abstract_params, self.param_shardings)

    def init_params(self, key: jax.Array) -> dict:
        """Random init of every parameter, created directly with its sharding (never materialised whole)."""
        if self._init_fn is None:
            self._init_fn = jax.jit(lambda k: sh.unbox(self.comps.init_all(k)), out_shardings=self.param_shardings)
        return self._init_fn(key)

    def copy_retention_from_unet(self, model_params: dict) -> dict:
        """Model params with the retention branch re-initialised from the primary U-Net (sharded, jitted)."""
        fn = jax.jit(init_retention_from_unet, out_shardings=self.param_shardings["model"])
        return fn(model_params)

    def put(self, tree: Any, shardings: Any) -> Any:
        """Host (numpy) or device arrays -> global arrays with `shardings` (every process passes the full value)."""
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx])
                            if not isinstance(x, jax.Array) else jax.device_put(x, s), tree, shardings)

    def split(self, params: dict) -> tuple[dict, dict]:
        """All params -> (trainable, frozen)."""
        trainable, frozen_model = st.split_model(params["model"], self.comps.trainable_paths)
        return trainable, {"model": frozen_model, "text_encoder": params["text_encoder"], "vae": params["vae"]}

    def merge(self, trainable: dict, frozen: dict) -> dict:
        return {"model": st.merge_model(trainable, frozen["model"]), "text_encoder": frozen["text_encoder"],
                "vae": frozen["vae"]}

    def init_state(self, trainable: dict) -> st.TrainState:
        if self._state_fn is None:
            seed = int(self.config.seed)
            self._state_fn = jax.jit(lambda p: st.init_state(p, self.tx, seed), out_shardings=self.state_shardings)
        return self._state_fn(trainable)

    # -- steps -------------------------------------------------------------------------------------------------

    def global_batch(self, local_batch: dict) -> dict:
        """This process's numpy batch -> global arrays sharded over ('data', 'fsdp')."""
        return sh.global_batch(step_lib.model_inputs(local_batch), self.mesh)

    def context(self):
        """Mesh and logical-rule context every traced computation of the model runs under."""
        return _Context(self.mesh, self.rules)

    def compile(self, state, frozen, batch) -> float:
        """Ahead-of-time compile of the train step for these shapes; returns the seconds it took."""
        t0 = time.perf_counter()
        with self.context():
            lowered = self._jit_step.lower(state, frozen, batch)
            self.lower_seconds = time.perf_counter() - t0
            self._compiled = lowered.compile()
        self.compile_seconds = time.perf_counter() - t0
        return self.compile_seconds

    def train_step(self, state, frozen, batch):
        """One update; `state` is donated (do not use it afterwards)."""
        if self._compiled is None:
            self.compile(state, frozen, batch)
        return self._compiled(state, frozen, batch)

    def cost_analysis(self) -> dict:
        if self._compiled is None:
            return {}
        c = self._compiled.cost_analysis()
        return c[0] if isinstance(c, (list, tuple)) and c else (c or {})


class _Context:
    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, rules
        self._stack = []

    def __enter__(self):
        m = jax.set_mesh(self.mesh)
        r = nn.logical_axis_rules(self.rules)
        m.__enter__()
        r.__enter__()
        self._stack.append((m, r))
        return self

    def __exit__(self, *exc):
        m, r = self._stack.pop()
        r.__exit__(*exc)
        m.__exit__(*exc)
        return False
