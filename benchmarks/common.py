"""What every benchmark suite shares: timing, FLOPs and memory of compiled programs, the library's train step
driven for timing (`TrainerBench`), memory limits, machine info, config loading and the JSON / table output.

Nothing here imports PyTorch; JAX and the library are imported where used, so `python -m benchmarks --help`
and the data suite start quickly.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

# ------------------------------------------------------------------------------------------------------------
# Timing.


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` (which must wait for its result) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    return statistics.median(time_calls(fn, repeats, warmup))


def threads() -> int:
    """CPU threads both frameworks may use (every core)."""
    return max(1, os.cpu_count() or 1)


def ratio(ours_s: float, torch_s: float) -> dict:
    """Ours / torch (below 1 = we are faster)."""
    return {"ours_s": ours_s, "torch_s": torch_s, "ratio": ours_s / torch_s}


# ------------------------------------------------------------------------------------------------------------
# FLOPs and memory of compiled programs.


def compiled_flops(compiled_or_lowered) -> float:
    """FLOPs from XLA's cost analysis of a `jax.stages.Compiled` or `Lowered` (0 if the backend has none)."""
    ca = compiled_or_lowered.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float((ca or {}).get("flops", 0.0))


def compiled_memory(compiled) -> dict:
    """Argument / output / temp / alias bytes of a compiled executable ({} if the backend reports none)."""
    try:
        ma = compiled.memory_analysis()
        return {k: int(getattr(ma, k)) for k in
                ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")}
    except Exception:  # noqa: BLE001 - not every backend reports it
        return {}


def available_bytes() -> int:
    """Memory this process can still get without swapping: what the OS has, plus what malloc holds free here."""
    import psutil

    from dreamvideo_jax.parallel.host_cpu import retained_free_bytes

    return int(psutil.virtual_memory().available) + retained_free_bytes()


# A point runs only if its compiled buffers (arguments + outputs + XLA temporaries) fit in this share of the
# available memory; the rest is left for the host runtime. Larger points are reported as skipped, not run into
# the OOM killer (which would take every suite's results with it).
MEMORY_HEADROOM = 0.8


def extrapolated_bytes(known: list[tuple[float, int]], x: float) -> Optional[float]:
    """Compiled bytes at `x` extrapolated along a line through the two largest known points below it, or None.

    Along a scaling sweep the train step's buffers are the fixed parameter / optimizer bytes plus activations
    that grow at least linearly in the swept size (frames, or latent pixels, where spatial attention is
    quadratic), so this line under-estimates larger points: above the memory, the point need not be compiled.
    """
    below = sorted(p for p in known if p[0] < x)[-2:]
    if len(below) < 2:
        return None
    (x0, b0), (x1, b1) = below
    return b1 + (b1 - b0) / (x1 - x0) * (x - x1)


def too_big(need: float, avail: int, extrapolated: bool) -> str:
    """Why a point was skipped."""
    how = ">= {:.1f} GiB of compiled buffers (extrapolated from the smaller points)" if extrapolated else \
        "{:.1f} GiB of compiled buffers"
    return (f"needs {how.format(need / 2**30)}, {avail / 2**30:.1f} GiB available "
            "(model.remat=True or a larger machine)")


def free_host_memory() -> None:
    """Return freed memory (a finished suite's PyTorch models, say) to the kernel before the next suite
    allocates: glibc keeps freed arenas otherwise."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------------------------
# The library's train step.


def one_device_mesh():
    """A 1x1x1 ('data', 'fsdp', 'tensor') mesh on the first device: the side-by-side suites compare one device
    with one PyTorch process, whatever `XLA_FLAGS` says."""
    import jax

    from dreamvideo_jax.parallel import mesh as mesh_lib

    return mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def lower_train_step(tr, state, frozen, batch):
    """The train step of `tr` (a `Trainer`) as `jax.stages.Lowered`, for shapes that may be abstract.

    `Trainer` reports `cost_analysis()` of its compiled step but not its memory analysis, and lowers only what
    it runs; so this jits the same step function (`training.step.make_train_step` over the trainer's system,
    optimizer, shardings and donation) once more. Its FLOPs equal `tr.cost_analysis()`'s."""
    import jax

    from dreamvideo_jax.parallel import sharding as sh
    from dreamvideo_jax.training.step import make_train_step

    fn = jax.jit(make_train_step(tr.system, tr.tx, tr.lr_fn),
                 in_shardings=(tr.state_shardings, tr.frozen_shardings, sh.batch_sharding(tr.mesh)),
                 out_shardings=(tr.state_shardings, sh.replicated(tr.mesh)), donate_argnums=(0,))
    with tr.context():
        return fn.lower(_abstract(state), _abstract(frozen), _abstract(batch))


class TrainerBench:
    """`Trainer.train_step` of one config on one fixed batch, as training runs it (sharded, state donated).

    Args:
        config: a full config (`model`, `train`, `diffusion`, `mesh`, `sharding`, clip size, `seed`).
        batch: this process's numpy batch (`video` or `latents`, `tokens` or `context`, `image`; see
            `training.step`), passed through `Trainer.global_batch`.
        mesh: default `config.mesh` over every device (what training uses).
        params: all parameters (the system's layout) to start from instead of `init_params` (they
            depend on neither the clip size nor remat, so benches of one model share one init); never donated.

    Nothing is compiled until `compile()` (or the first step), so `memory()` can rule a shape out first.
    """

    def __init__(self, config, batch: dict, mesh=None, params=None):
        import jax
        import jax.numpy as jnp

        from dreamvideo_jax.training.trainer import Trainer

        self.config = config
        self.tr = Trainer(config, mesh)
        t0 = time.perf_counter()
        if params is None:
            params = self.tr.init_params(jax.random.key(int(config.seed)))
            jax.block_until_ready(params)
        self.init_s = time.perf_counter() - t0
        self.params = params
        trainable, self.frozen = self.tr.split(params)
        # A copy: the state is donated to every step, and `params` may be shared with other benches.
        self.state = self.tr.init_state(jax.tree.map(jnp.copy, trainable))
        self.batch = self.tr.global_batch(batch)
        self.compile_s: Optional[float] = None
        self.metrics: Optional[dict] = None
        self._memory: Optional[dict] = None

    def compile(self) -> float:
        if self.compile_s is None:
            self.compile_s = self.tr.compile(self.state, self.frozen, self.batch)
        return self.compile_s

    def step(self) -> None:
        """One `train_step`, waited for."""
        import jax

        self.compile()
        self.state, self.metrics = self.tr.train_step(self.state, self.frozen, self.batch)
        jax.block_until_ready(self.metrics)

    def time_steps(self, repeats: int, warmup: int = 1) -> list[float]:
        return time_calls(self.step, repeats, warmup)

    def time_train(self, repeats: int, warmup: int = 1) -> float:
        """Median seconds of a train step."""
        return statistics.median(self.time_steps(repeats, warmup))

    def flops(self) -> float:
        self.compile()
        return float(self.tr.cost_analysis().get("flops", 0.0))

    def memory(self) -> dict:
        """Compiled bytes of the step (`temp_bytes`, `argument_bytes`, `output_bytes`, `alias_bytes`); compiles
        the step once more for it (`lower_train_step`), once per bench."""
        if self._memory is None:
            ma = compiled_memory(lower_train_step(self.tr, self.state, self.frozen, self.batch).compile())
            self._memory = {k.replace("_size_in", ""): v for k, v in ma.items()}
        return self._memory

    def model_params(self) -> dict:
        """The model's current parameters (trainable ones from the latest state)."""
        return self.tr.system.model_params(self.tr.merge(self.state.params, self.frozen))

    def param_counts(self) -> dict:
        n = lambda tree: int(sum(x.size for x in _leaves(tree)))  # noqa: E731
        trainable, frozen = self.tr.split(self.params)
        groups = self.tr.system.model_groups
        return {"trainable": n(trainable), "frozen_model": n({k: v for k, v in frozen.items() if k in groups}),
                "text_encoder": n(frozen["text_encoder"]), "vae": n(frozen["vae"])}


def _leaves(tree) -> list:
    import jax

    return jax.tree_util.tree_leaves(tree)


# ------------------------------------------------------------------------------------------------------------
# Configs.


def load_config(spec: str):
    """`configs/X.py[:arg]` -> `get_config(arg)` of that file (as absl's config_flags reads --config)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    mod_spec = importlib.util.spec_from_file_location(f"_bench_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# ------------------------------------------------------------------------------------------------------------
# Machine info and output.


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    import jax

    from dreamvideo_jax.parallel.host_cpu import freed_memory_retained

    return {"cores": os.cpu_count(), "threads": threads(), "python": platform.python_version(),
            "machine": platform.machine(), "jax": jax.__version__, "torch": _version("torch"),
            "devices": str(jax.devices()), "freed_memory_retained": freed_memory_retained()}


def write_json(path: str, obj: Any) -> str:
    """Indented JSON, written atomically (a killed run never leaves half a file)."""
    from dreamvideo_jax.sampling import outputs

    return outputs.write_json(path, obj)


def gib(b: float) -> str:
    return f"{b / 2**30:.3f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def print_machine(mi: dict) -> None:
    kept = "retained" if mi.get("freed_memory_retained") else "returned to the kernel"
    print(f"\n== machine: {mi['cores']} cores, {mi['threads']} threads, python {mi['python']}, jax {mi['jax']}, "
          f"torch {mi['torch']}, freed memory {kept}")


def print_walls(res: dict) -> None:
    walls = res.get("suite_wall_s")
    if walls:
        print("\n== wall seconds per suite: " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items())
              + f"; total {res['total_wall_s']:.0f} s")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
