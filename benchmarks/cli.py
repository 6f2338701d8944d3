"""Benchmarks of dreamvideo_jax: the model against PyTorch/diffusers, one config's train step, the input pipeline
and the sampling loop.

  python -m benchmarks [--suite=all] [--quick] [--output=FILE.json] [--retain_freed_memory]
  python -m benchmarks --suite=config --config=configs/demo_shapes.py:t2v [--steps=10] [--step_memory]
  python -m benchmarks --suite=data [--data_batch_size=16 --data_batches=60 --train_step_s=0.26 --skip_real]
  python -m benchmarks --suite=sampling_loop [--config=configs/tiny.py] [--sampling_steps=10,25 ...] [--toy_models]
  python -m benchmarks --suite=lora [--config=configs/tiny.py] [--lora_rank=16] [--steps=10] [--step_memory]
  PYTHONPATH=.:/path/to/libtpu_pkg python -m benchmarks --suite=attention_tpu

Suites (each module's docstring has the details):
  train, sample, memory, scaling, fullsize   benchmarks/model.py: the U-Net + retention branch side by side
      with diffusers (train step, forward, 25-step double-guidance sampling), remat and FSDP memory, scaling
      with frames and latent size, and full-size FLOPs with TPU estimates. `all` runs these five in one process,
      sharing the compiled train step and its parameters (`--quick`: smaller shapes and fewer repeats).
  config          benchmarks/train_config.py: the real train step of one config file (`--config`, required;
      `--config.train.batch_size=8` style overrides work).
  data            benchmarks/data.py: input-pipeline clips/s next to what the demo's train step consumes.
  sampling_loop   benchmarks/sampling.py: the sampling pipeline's Python loop vs lax.scan (`--config`, default
      configs/tiny.py).
  lora            benchmarks/lora.py: LoRA fine-tuning (rank `--lora_rank`, the config's `train.lora.targets`)
      against full fine-tuning of `train.trainable`: trainable parameters, optimizer and gradient bytes, step time
      (`--config`, default configs/tiny.py).
  attention_tpu   benchmarks/attention_tpu.py: the attention implementations compiled by XLA:TPU for a v5e chip
      without a TPU (libtpu on PYTHONPATH): memory, FLOPs, bytes, roofline. Its own flags: `python -m
      benchmarks.attention_tpu --help`.

Train steps are timed as `Trainer.train_step` runs them, sampling as `Sampler` runs it; every table says what
each side times. `--retain_freed_memory` keeps freed memory in the process for both frameworks
(dreamvideo_jax/parallel/host_cpu.py): by default glibc hands every large block back to the kernel on free, so each
default-size train step faults its 4.4 GiB of XLA temporaries in again (1.28 M page faults, ~4.8 s of system
time); retained, 0 faults, but malloc's single arena slows XLA's compiles by 20-35 s each, so it is off by default
(WORKSPACE.md, Benchmarks).

Results go to `--output` as nested dicts, e.g. {"train": {"train_step": {"ours_s", "torch_s", "ratio"}, ...}},
written after every suite (`"complete": false` until the last), so a run that is killed keeps what it finished.
Ratios are ours / torch (below 1 = we are faster). Each suite's wall time is in the table and the JSON
(`suite_wall_s`).
"""

from __future__ import annotations

import time
from typing import Any, Optional

from absl import app, flags

from benchmarks import attention_tpu, common, data, lora, model, sampling, train_config

ALL = tuple(model.SUITES)  # --suite=all
SUITES = ALL + ("config", "data", "sampling_loop", "lora", "attention_tpu")
DEFAULT_SAMPLING_CONFIG = "configs/tiny.py"


def define_flags(fv: flags.FlagValues) -> None:
    from ml_collections import config_flags

    flags.DEFINE_enum("suite", "all", SUITES + ("all",), "Suite to run; all = " + " ".join(ALL) + ".",
                      flag_values=fv)
    flags.DEFINE_string("output", "", "Write the results as JSON to this file.", flag_values=fv)
    flags.DEFINE_bool("quick", False, "Smaller shapes and fewer repeats (train/sample/memory/scaling).",
                      flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "--suite=config (required) and sampling_loop: config file, "
                                    "configs/X.py[:arg].", flag_values=fv)
    flags.DEFINE_integer("steps", 10, "--suite=config and lora: timed train steps.", flag_values=fv)
    flags.DEFINE_integer("lora_rank", 16, "--suite=lora: adapter rank.", flag_values=fv)
    flags.DEFINE_bool("step_memory", False, "--suite=config and lora: also the compiled step's memory (compiles it "
                      "once more).", flag_values=fv)
    flags.DEFINE_bool("retain_freed_memory", False, "Keep freed memory in the process for both frameworks "
                      "(parallel/host_cpu.py): no page faults per step, slower compiles.", flag_values=fv)
    flags.DEFINE_integer("data_batch_size", 16, "--suite=data: clips per batch.", flag_values=fv)
    flags.DEFINE_integer("data_batches", 60, "--suite=data: timed batches.", flag_values=fv)
    flags.DEFINE_float("train_step_s", 0.26, "--suite=data: seconds per demo train step (data_batch_size clips).",
                       flag_values=fv)
    flags.DEFINE_integer("data_num_train", 1000, "--suite=data: moving-shapes clips to build.", flag_values=fv)
    flags.DEFINE_bool("skip_real", False, "--suite=data: skip the 256x256 real-video scenario.", flag_values=fv)
    flags.DEFINE_list("sampling_steps", ["10", "25"], "--suite=sampling_loop: step counts.", flag_values=fv)
    flags.DEFINE_list("sampling_batch", ["1"], "--suite=sampling_loop: batch sizes.", flag_values=fv)
    flags.DEFINE_list("samplers", ["ddim", "dpmpp_2m"], "--suite=sampling_loop: samplers.", flag_values=fv)
    flags.DEFINE_list("loops", ["python", "scan"], "--suite=sampling_loop: loops.", flag_values=fv)
    flags.DEFINE_integer("sampling_repeats", 3, "--suite=sampling_loop: timed runs per row.", flag_values=fv)
    flags.DEFINE_bool("toy_models", False, "--suite=sampling_loop: also diffusion.samplers.sample on two toy conv "
                      "models.", flag_values=fv)


def _config(config: Any):
    """(config, name) from a ConfigDict or a `configs/X.py[:arg]` string."""
    if isinstance(config, str):
        return common.load_config(config), config
    return config, ""


def run(suites, quick: bool = False, config: Any = None, steps: int = 10, suite_sizes: Optional[dict] = None,
        output: str = "", config_name: str = "", step_memory: bool = False, data_options: Optional[dict] = None,
        sampling_options: Optional[dict] = None, lora_rank: int = 16) -> dict:
    """Runs the suites in order; `suite_sizes` replaces `model.sizes(quick)` (the tests use tiny shapes).
    `config`: a ConfigDict or a `configs/X.py[:arg]` string (the config suite; sampling_loop, default
    configs/tiny.py). With `output`, the results so far are written after every suite."""
    s = suite_sizes or model.sizes(quick)
    res = {"machine": common.machine_info(), "quick": quick, "suite_wall_s": {}}
    cache: dict = {}

    def config_suite():
        if config is None:
            raise ValueError("--suite=config needs --config=configs/X.py[:arg]")
        cfg, name = _config(config)
        return {"config_file": config_name or name, **train_config.run(cfg, steps, step_memory)}

    def sampling_suite():
        cfg, name = _config(DEFAULT_SAMPLING_CONFIG if config is None else config)
        return sampling.run(cfg, config_name=config_name or name, **(sampling_options or {}))

    def lora_suite():
        cfg, name = _config(DEFAULT_SAMPLING_CONFIG if config is None else config)
        return {"config_file": config_name or name or DEFAULT_SAMPLING_CONFIG,
                **lora.run(cfg, steps, lora_rank, step_memory)}

    fns = {name: (lambda f: lambda: f(s, cache))(f) for name, f in model.SUITES.items()}
    fns.update(config=config_suite, data=lambda: data.run(**(data_options or {})), sampling_loop=sampling_suite,
               lora=lora_suite, attention_tpu=attention_tpu.run)
    t_all = time.perf_counter()
    for name in suites:
        t0 = time.perf_counter()
        res[name] = fns[name]()
        common.free_host_memory()  # the suite's PyTorch models died with its locals
        res[name]["suite_wall_s"] = res["suite_wall_s"][name] = time.perf_counter() - t0
        common.log(f"[{name}: {res[name]['suite_wall_s']:.0f} s]")
        if output:
            common.write_json(output, {**res, "complete": False})
    res["total_wall_s"] = time.perf_counter() - t_all
    res["complete"] = True
    # Flat copies of the headline ratios at the top level.
    if "train" in res:
        res["train_step"] = res["train"]["train_step"]
        res["forward"] = res["train"]["forward"]
    if "sample" in res:
        res["sample_ddim"] = res["sample"]["sample_ddim"]
    return res


def print_tables(res: dict) -> None:
    common.print_machine(res["machine"])
    model.print_tables(res)
    if "config" in res:
        train_config.print_table(res["config"])
    if "data" in res:
        data.print_table(res["data"])
    if "sampling_loop" in res:
        sampling.print_table(res["sampling_loop"])
    if "lora" in res:
        lora.print_table(res["lora"])
    if "attention_tpu" in res:
        attention_tpu.print_table(res["attention_tpu"])
    common.print_walls(res)


def _run_flags(fv: flags.FlagValues) -> dict:
    if fv.suite == "config" and fv.config is None:
        raise app.UsageError("--suite=config needs --config=configs/X.py[:arg]")
    if fv.retain_freed_memory:
        from dreamvideo_jax.parallel.host_cpu import retain_freed_memory

        retain_freed_memory()
    from ml_collections import config_flags

    name = config_flags.get_config_filename(fv["config"]) if fv.config is not None else ""
    suites = ALL if fv.suite == "all" else (fv.suite,)
    res = run(suites, fv.quick, fv.config, fv.steps, output=fv.output, config_name=name,
              step_memory=fv.step_memory, lora_rank=fv.lora_rank,
              data_options=dict(batch_size=fv.data_batch_size, batches=fv.data_batches, train_step_s=fv.train_step_s,
                                num_train=fv.data_num_train, skip_real=fv.skip_real),
              sampling_options=dict(steps=tuple(int(x) for x in fv.sampling_steps),
                                    batches=tuple(int(x) for x in fv.sampling_batch), samplers=tuple(fv.samplers),
                                    loops=tuple(fv.loops), repeats=fv.sampling_repeats, toy_models=fv.toy_models))
    print_tables(res)
    if fv.output:
        common.write_json(fv.output, res)
        print(f"\nwrote {fv.output}")
    return res


def main(argv: list[str]) -> dict:
    """Parses `argv` (flags only, no program name) into fresh flags and runs; what `python -m benchmarks` does,
    callable in-process (tests)."""
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["benchmarks"] + list(argv))
    return _run_flags(fv)


def run_from_flags(argv: list[str]) -> None:
    """`python -m benchmarks` (benchmarks/__main__.py), after absl parsed the global flags."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    _run_flags(flags.FLAGS)
