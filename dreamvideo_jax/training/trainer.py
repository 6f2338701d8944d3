"""A config's system on a mesh: shardings and the compiled train step, without any I/O.

`Trainer` is what the loop, the tools and tests drive:

  tr = Trainer(config)                              # tr.system: the config's System; mesh from config.mesh
  params = tr.init_params(jax.random.key(seed))     # shape-first sharded init, in the system's layout
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

from dreamvideo_jax.parallel import mesh as mesh_lib
from dreamvideo_jax.parallel import sharding
from dreamvideo_jax.system import System
from dreamvideo_jax.training import config as train_config
from dreamvideo_jax.training import state as state_lib
from dreamvideo_jax.training import step as step_lib


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Trainer:
    def __init__(self, config, mesh: jax.sharding.Mesh | None = None, devices=None):
        train_config.check_config(config)
        self.config = config
        self.system = System(config)
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh, devices)
        self.rules = mesh_lib.rules_from_config(config.sharding)
        divisor = mesh_lib.batch_divisor(self.mesh)
        train_config.resolve_batch_size(config, divisor)  # train.per_device_batch_size -> train.batch_size
        if int(config.train.batch_size) % divisor:
            raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by the mesh's "
                             f"data x fsdp = {divisor} devices (or set train.per_device_batch_size, which "
                             f"scales with the slice)")
        if int(config.train.batch_size) % jax.process_count():
            raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by the process "
                             f"count {jax.process_count()}")
        fsdp_min = int(config.sharding.get("fsdp_min_size", 0))
        # Boxed abstract tree -> shardings (an unboxed tree in the layout).
        self.param_shardings = sharding.tree_shardings(self.system.boxed_abstract, self.mesh, self.rules, fsdp_min)
        self.abstract_params = self.system.abstract
        if self.system.lora is not None:  # LoRA: the adapters (small, replicated) train; the whole layout is frozen
            abs_trainable = self.system.lora_abstract
            self.trainable_shardings = jax.tree.map(lambda _: sharding.replicated(self.mesh), abs_trainable)
            self.frozen_shardings, abs_frozen = self.param_shardings, self.abstract_params
        else:
            self.trainable_shardings, self.frozen_shardings = self.system.split(self.param_shardings)
            abs_trainable, abs_frozen = self.system.split(self.abstract_params)
        abs_frozen = self.system.store_frozen(abs_frozen)  # model.frozen_dtype
        self.tx, self.lr_fn = state_lib.make_optimizer(config.train)
        seed = int(config.seed)
        abs_state = jax.eval_shape(lambda p: state_lib.init_state(p, self.tx, seed), abs_trainable)
        self.state_shardings = state_lib.state_shardings(abs_state, self.trainable_shardings, self.tx, self.mesh)
        self.abstract_state = _with_shardings(abs_state, self.state_shardings)
        self.abstract_frozen = _with_shardings(abs_frozen, self.frozen_shardings)
        self._step_fn = step_lib.make_train_step(self.system, self.tx, self.lr_fn)
        self._jit_step = jax.jit(
            self._step_fn,
            in_shardings=(self.state_shardings, self.frozen_shardings, sharding.batch_sharding(self.mesh)),
            out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
            donate_argnums=(0,),
        )
        self._jit_eval = jax.jit(
            step_lib.make_eval_step(self.system),
            in_shardings=(self.trainable_shardings, self.frozen_shardings, sharding.batch_sharding(self.mesh),
                          sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)),
            out_shardings=sharding.replicated(self.mesh),
        )
        self._compiled = None
        self._init_fn = None
        self._state_fn = None
        self._adapters_fn = None
        self.compile_seconds = None
        self.lower_seconds = None

    # -- parameters ------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.system.mode

    @property
    def compiled(self) -> bool:
        """Whether the train step is compiled (by :meth:`compile` or the first :meth:`train_step`)."""
        return self._compiled is not None

    def with_shardings(self, abstract: Any, shardings: Any) -> Any:
        return _with_shardings(abstract, shardings)

    def abstract_all(self) -> dict:
        """ShapeDtypeStructs (with shardings) of all params, in the system's layout."""
        return _with_shardings(self.abstract_params, self.param_shardings)

    def init_params(self, key: jax.Array) -> dict:
        """Random init of every parameter, created directly with its sharding (never materialised whole)."""
        if self._init_fn is None:
            self._init_fn = jax.jit(lambda k: sharding.unbox(self.system.init(k)), out_shardings=self.param_shardings)
        return self._init_fn(key)

    def copy_retention_from_unet(self, params: dict) -> dict:
        """Params with the retention branch re-initialised from the primary U-Net (sharded, jitted)."""
        fn = jax.jit(self.system.copy_retention_from_unet, out_shardings=self.param_shardings)
        return fn(params)

    def put(self, tree: Any, shardings: Any) -> Any:
        """Host (numpy) or device arrays -> global arrays with `shardings` (every process passes the full value)."""
        return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx])
                            if not isinstance(x, jax.Array) else jax.device_put(x, s), tree, shardings)

    def split(self, params: dict) -> tuple[dict, dict]:
        """All params -> (trainable, frozen) (`System.split`), the frozen half stored in `model.frozen_dtype`.
        With LoRA: (fresh adapters drawn from `config.seed`, all params)."""
        if self.system.lora is not None:
            return self.init_adapters(), self.system.store_frozen(params)
        trainable, frozen = self.system.split(params)
        return trainable, self.system.store_frozen(frozen)

    def init_adapters(self) -> dict:
        """Fresh LoRA adapters (A random, B zero), replicated over the mesh."""
        from dreamvideo_jax import lora as lora_lib

        key = jax.random.fold_in(jax.random.key(int(self.config.seed)), 0x10AA)
        if self._adapters_fn is None:
            self._adapters_fn = jax.jit(lambda k: lora_lib.init(self.system.lora_abstract, k),
                                        out_shardings=self.trainable_shardings)
        return self._adapters_fn(key)

    def merge(self, trainable: dict, frozen: dict) -> dict:
        """The weights the model runs with (`System.combine`: with LoRA, the adapters merged into the base)."""
        return self.system.combine(trainable, frozen)

    def init_state(self, trainable: dict) -> state_lib.TrainState:
        if self._state_fn is None:
            seed = int(self.config.seed)
            self._state_fn = jax.jit(lambda p: state_lib.init_state(p, self.tx, seed), out_shardings=self.state_shardings)
        return self._state_fn(trainable)

    # -- steps -------------------------------------------------------------------------------------------------

    def global_batch(self, local_batch: dict) -> dict:
        """This process's numpy batch -> global arrays sharded over ('data', 'fsdp')."""
        return sharding.global_batch(step_lib.model_inputs(local_batch), self.mesh)

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

    def abstract_batch(self) -> dict:
        """ShapeDtypeStructs (with the batch sharding) of the global batch the data pipeline feeds the step:
        ``video`` ``(B, F, H, W, 3)`` (float32, or uint8 with ``data.as_uint8``) and ``tokens`` ``(B, L)``."""
        c = self.config
        b = int(c.train.batch_size)
        data = c.get("data") or {}
        frames = int(data.get("num_frames") or c.num_frames)
        height, width = int(data.get("height") or c.height), int(data.get("width") or c.width)
        video_dtype = np.uint8 if data.get("as_uint8", False) else np.float32
        bs = sharding.batch_sharding(self.mesh)
        return {"video": jax.ShapeDtypeStruct((b, frames, height, width, 3), video_dtype, sharding=bs),
                "tokens": jax.ShapeDtypeStruct((b, self.system.context_length), np.int32, sharding=bs)}

    @property
    def executable(self):
        """The compiled train step (`jax.stages.Compiled`; None before :meth:`compile` or the first step)."""
        return self._compiled

    def memory_analysis(self):
        """XLA's per-device memory figures of the compiled train step (None before :meth:`compile`)."""
        return None if self._compiled is None else self._compiled.memory_analysis()

    def train_step(self, state, frozen, batch):
        """One update; `state` is donated (do not use it afterwards)."""
        if self._compiled is None:
            self.compile(state, frozen, batch)
        return self._compiled(state, frozen, batch)

    def eval_step(self, trainable, frozen, batch: dict, mask, key) -> dict:
        """`{'loss_sum', 'count'}` of one evaluation batch (`make_eval_step`); `mask` marks its real rows."""
        with self.context():
            return self._jit_eval(trainable, frozen, batch, mask, key)

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
