"""Compile the real training and sampling programs for a TPU slice, on any machine, and measure them.

The programs are the ones training and sampling run: `Trainer`'s train step and `Sampler.lower`'s text encoder,
`prepare`, guided denoising step and VAE decode, laid over a mesh of the devices of a TPU topology description
(`jax.experimental.topologies`, from libtpu), lowered for abstract inputs (nothing is allocated) and compiled by
XLA:TPU. Per program: XLA's per-chip memory figures, FLOPs and bytes, and a roofline time from the chip's
published peak.

    python -m dreamvideo_jax.aot --config=configs/modelscope_t2v.py --topology=v5e-16 --program=train
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import Any

from dreamvideo_jax.aot import chips as chips_lib
from dreamvideo_jax.errors import InputError, UserError

log = logging.getLogger(__name__)

PROGRAMS = ("train", "sample")
DEFAULT_HEADROOM = 0.10  # share of HBM kept free for XLA's runtime, the input pipeline and fragmentation


def tpu_environment() -> None:
    """Environment libtpu needs on a machine that is not a TPU VM: no metadata server query, no machine-wide
    lock (so several compiling processes may load it), and CPU as JAX's default backend (programs are compiled
    for the topology, never run). Call before JAX initialises its backends; values already set are kept."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu warns that it found no TPU workers


def topology_devices(slice_: chips_lib.Slice, num_devices: int = 0) -> list:
    """The devices of `slice_`'s topology description (the first `num_devices` when > 0).

    Raises:
        UserError: libtpu is not installed (`pip install -e ".[tpu]"`), or it rejects the topology.
    """
    from jax.experimental import topologies

    # What a TPU VM's metadata would say (without it libtpu prints warnings; the topology is given anyway).
    chip = slice_.chip
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{'v5litepod' if chip.name == 'v5e' else chip.name}-"
                                                  f"{slice_.chips * chip.cores_per_chip}")
    try:
        topo = topologies.get_topology_desc(topology_name=slice_.topology, platform="tpu", **dict(slice_.options))
    except RuntimeError as e:
        text = " ".join(str(e).split())
        if "not installed" in text or "Unknown backend" in text or "libtpu" in text.lower():
            raise UserError(f"compiling for TPU needs libtpu, which is not installed: pip install -e \".[tpu]\" "
                            f"(or the test extras) ({text[:200]})") from None
        raise InputError("topology", slice_.topology, f"rejected by libtpu: {text[:300]}") from None
    devices = list(topo.devices)
    if num_devices:
        if not 0 < num_devices <= len(devices):
            raise InputError("devices", num_devices, f"the topology {slice_.topology} has {len(devices)} devices")
        devices = devices[:num_devices]
    return devices


@dataclasses.dataclass
class ProgramReport:
    """XLA's figures for one compiled program, per chip."""

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    transcendentals: float
    xla_optimal_seconds: float | None
    lower_seconds: float
    compile_seconds: float
    largest: list[dict]

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not aliased to arguments + temporaries + code: what the program holds at once."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

    def roofline_seconds(self, chip: chips_lib.Chip) -> float:
        return max(self.flops / chip.bf16_flops, self.bytes_accessed / chip.hbm_bandwidth)

    def as_dict(self, chip: chips_lib.Chip) -> dict:
        d = dataclasses.asdict(self)
        roof = self.roofline_seconds(chip)
        d.update(peak_bytes=self.peak_bytes, peak_gib=self.peak_bytes / chips_lib.GIB,
                 compute_seconds=self.flops / chip.bf16_flops,
                 memory_seconds=self.bytes_accessed / chip.hbm_bandwidth, roofline_seconds=roof,
                 bound="compute" if self.flops / chip.bf16_flops >= self.bytes_accessed / chip.hbm_bandwidth
                 else "memory",
                 mfu_bound=(self.flops / chip.bf16_flops) / roof if roof > 0 else 0.0)
        return d


_SHAPE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|"
                    r"f8e4m3fn|f8e5m2|c64|c128)\[([\d,]*)\]\S*\s+([\w\-]+)\(", re.M)
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "c64": 8, "c128": 16}


def largest_values(hlo_text: str, top: int = 5) -> list[dict]:
    """The largest array values of a compiled (per-chip) HLO module: name, op, shape, bytes."""
    seen: dict[tuple, dict] = {}
    for name, dtype, dims, op in _SHAPE.findall(hlo_text):
        if op in ("parameter", "get-tuple-element", "bitcast", "constant"):
            continue
        shape = tuple(int(d) for d in dims.split(",") if d)
        n = 1
        for d in shape:
            n *= d
        nbytes = int(n * _BYTES[dtype])
        key = (dtype, shape)
        if key not in seen or seen[key]["bytes"] < nbytes:
            seen[key] = {"name": name, "op": op, "shape": f"{dtype}[{','.join(map(str, shape))}]", "bytes": nbytes}
    return sorted(seen.values(), key=lambda d: -d["bytes"])[:top]


COMPILER_STACK_BYTES = 1 << 30


def with_large_stack(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on a thread with a 1 GiB stack (reserved, not used): XLA:TPU's compiler recurses deeply
    on the largest programs and overflows a default 8 MiB main-thread stack (a segmentation fault)."""
    import threading

    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            result["error"] = e

    old = threading.stack_size()
    threading.stack_size(COMPILER_STACK_BYTES)
    try:
        thread = threading.Thread(target=target, name="xla-compile")
        thread.start()
    finally:
        threading.stack_size(old)
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def measure(name: str, lowered, lower_seconds: float) -> tuple[ProgramReport, Any]:
    """Compiles `lowered` and reads XLA's memory and cost analyses; returns the report and the executable."""
    t0 = time.perf_counter()
    compiled = with_large_stack(lowered.compile)
    compile_seconds = time.perf_counter() - t0
    return report_of(name, compiled, lower_seconds, compile_seconds), compiled


def report_of(name: str, compiled, lower_seconds: float, compile_seconds: float) -> ProgramReport:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - the largest values are a diagnosis, not a result
        text = ""
    return ProgramReport(
        name=name, argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes), flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)), transcendentals=float(cost.get("transcendentals", 0.0)),
        xla_optimal_seconds=(float(cost["optimal_seconds"]) if "optimal_seconds" in cost else None),
        lower_seconds=lower_seconds, compile_seconds=compile_seconds, largest=largest_values(text))


# ----------------------------------------------------------------------------------------------------------------
# The programs


def compile_train(config, devices) -> tuple[list[ProgramReport], dict, Any]:
    """The real `Trainer` train step on a mesh of `devices` (config.mesh), for the global batch the data pipeline
    would feed it. Returns its report, facts about the run (batch, mesh, parameter counts) and the Trainer
    (holding the compiled step)."""
    import jax
    import numpy as np

    from dreamvideo_jax.training.trainer import Trainer

    tr = Trainer(config, devices=devices)
    batch = tr.abstract_batch()
    t0 = time.perf_counter()
    with_large_stack(tr.compile, tr.abstract_state, tr.abstract_frozen, batch)
    report = report_of("train_step", tr.executable, tr.lower_seconds, tr.compile_seconds - tr.lower_seconds)
    trainable, frozen = tr.split(tr.abstract_params)
    count = lambda tree: int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))  # noqa: E731
    facts = dict(global_batch=int(config.train.batch_size),
                 batch_per_chip=int(config.train.batch_size) / len(devices),
                 clip=[int(s) for s in batch["video"].shape[1:4]], mesh=dict(tr.mesh.shape),
                 trainable_parameters=count(trainable), frozen_parameters=count(frozen),
                 seconds=time.perf_counter() - t0)
    return [report], facts, tr


def compile_sample(config, devices, *, batch: int = 1, num_frames: int | None = None, height: int | None = None,
                   width: int | None = None) -> tuple[list[ProgramReport], dict]:
    """The real `Sampler` programs of one request (`Sampler.lower`) for abstract weights on a mesh of `devices`
    (the batch split over it: one sample per data-parallel device)."""
    import jax
    import numpy as np

    from dreamvideo_jax.parallel import mesh as mesh_lib
    from dreamvideo_jax.sampling.pipeline import Sampler
    from dreamvideo_jax.system import System

    system = System(config)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), system.abstract)
    sampler = Sampler(config, params)
    mesh = jax.sharding.Mesh(np.asarray(devices), (mesh_lib.DATA,))
    t0 = time.perf_counter()
    lowered = sampler.lower(batch, mesh=mesh, num_frames=num_frames, height=height, width=width)
    lower_seconds = time.perf_counter() - t0
    reports = []
    for name, low in lowered.items():
        rep, _ = measure(name, low, lower_seconds if name == "encode_text" else 0.0)
        log.info("compiled %s: peak %.3f GiB, %.1f s", name, rep.peak_bytes / chips_lib.GIB, rep.compile_seconds)
        reports.append(rep)
    f, h, w = sampler.default_size()
    facts = dict(batch=batch, clip=[num_frames or f, height or h, width or w], mesh={mesh_lib.DATA: len(devices)},
                 sampler=sampler.options.sampler, loop=sampler.options.loop,
                 guidance_rows=3 * batch if sampler.mode == "dreamvideo" else 2 * batch,
                 seconds=time.perf_counter() - t0)
    return reports, facts


# ----------------------------------------------------------------------------------------------------------------
# The report


def suggestions(config, program: str, chip: chips_lib.Chip) -> list[str]:
    """Config changes that lower the memory of `program`, as --config flags (the ones not already set)."""
    m, out = config.model, []
    if program == "train" and not m.get("remat", False):
        out.append("--config.model.remat=True (recompute activations in the backward)")
    if m.get("dtype", "float32") == "float32":
        out.append("--config.model.dtype=bfloat16 (bf16 activations)")
    if program == "train":
        if int(config.mesh.get("fsdp", 1)) == 1:
            out.append("--config.mesh.data=1 --config.mesh.fsdp=-1 (shard parameters and optimizer state)")
        per = int(config.train.get("per_device_batch_size", 0))
        if per > 1:
            out.append(f"--config.train.per_device_batch_size={per // 2}")
    else:
        out.append("a smaller clip or batch (--frames / --height / --width / --batch)")
    out.append(f"a chip with more HBM than {chip.name}'s {chip.hbm_bytes / chips_lib.GIB:.0f} GiB, or more chips")
    return out


def summarize(config, program: str, slice_: chips_lib.Slice, num_devices: int, reports: list[ProgramReport],
              facts: dict, headroom: float = DEFAULT_HEADROOM) -> dict:
    """The JSON report: chip, slice, each program's figures, the peak, whether it fits, the roofline."""
    chip = slice_.chip
    budget = chip.hbm_bytes * (1.0 - headroom)
    peak = max(reports, key=lambda r: r.peak_bytes)
    main = reports[0] if program == "train" else next(r for r in reports if r.name == "step")
    roof = main.roofline_seconds(chip)
    fits = peak.peak_bytes <= budget
    m = config.model
    out = dict(
        program=program, topology=slice_.topology, chips=num_devices, chip=chip.as_dict(),
        config=dict(dtype=m.get("dtype", "float32"), param_dtype=m.get("param_dtype", "float32"),
                    remat=bool(m.get("remat", False)), attention=m.get("attention", "closed_form"),
                    mesh=facts.get("mesh")),
        facts=facts,
        programs=[r.as_dict(chip) for r in reports],
        peak_bytes=peak.peak_bytes, peak_gib=peak.peak_bytes / chips_lib.GIB, peak_program=peak.name,
        hbm_gib=chip.hbm_bytes / chips_lib.GIB, headroom=headroom, fits=fits,
        free_gib=(chip.hbm_bytes - peak.peak_bytes) / chips_lib.GIB,
        step_program=main.name, roofline_seconds=roof, mfu_bound=main.as_dict(chip)["mfu_bound"],
        bound=main.as_dict(chip)["bound"],
        compile_seconds=sum(r.compile_seconds for r in reports), lower_seconds=sum(r.lower_seconds for r in reports),
    )
    if not fits:
        out["largest"] = peak.largest
        out["suggestions"] = suggestions(config, program, chip)
    return out


def table(report: dict) -> str:
    """The report as a readable table."""
    gib = chips_lib.GIB
    chip = report["chip"]
    lines = [f"{report['program']} on {report['topology']} ({report['chips']} x {chip['device_kind']}, "
             f"{report['hbm_gib']:.0f} GiB HBM, {chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
             f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s); config {report['config']}",
             f"{'program':<12} {'args GiB':>9} {'out GiB':>8} {'alias':>6} {'temp GiB':>9} {'peak GiB':>9} "
             f"{'TFLOP':>9} {'GB acc':>9} {'roof ms':>9} {'bound':>7} {'compile s':>9}"]
    for p in report["programs"]:
        lines.append(f"{p['name']:<12} {p['argument_bytes'] / gib:9.3f} {p['output_bytes'] / gib:8.3f} "
                     f"{p['alias_bytes'] / gib:6.2f} {p['temp_bytes'] / gib:9.3f} {p['peak_gib']:9.3f} "
                     f"{p['flops'] / 1e12:9.3f} {p['bytes_accessed'] / 1e9:9.2f} {1e3 * p['roofline_seconds']:9.1f} "
                     f"{p['bound']:>7} {p['compile_seconds']:9.1f}")
    verdict = "FITS" if report["fits"] else "DOES NOT FIT"
    lines.append(f"{verdict}: peak {report['peak_gib']:.2f} GiB ({report['peak_program']}) of "
                 f"{report['hbm_gib']:.0f} GiB per chip with {100 * report['headroom']:.0f}% kept free; "
                 f"{report['step_program']} roofline {1e3 * report['roofline_seconds']:.1f} ms "
                 f"({report['bound']}-bound), MFU bound {100 * report['mfu_bound']:.0f}%")
    if not report["fits"]:
        for v in report.get("largest", []):
            lines.append(f"  largest: {v['shape']} {v['bytes'] / gib:.2f} GiB ({v['op']} {v['name']})")
        for s in report.get("suggestions", []):
            lines.append(f"  try: {s}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Search


def candidates(config, num_devices: int) -> list[dict]:
    """Train-step settings to try, as `{config key: value}` overrides: remat off/on x clips per chip 1, 2, 4 x
    parameters sharded over every chip (fsdp) or replicated (data parallel), and tensor parallelism of 2 where
    the chips allow. The config's own values are included."""
    out = []
    meshes = [{"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}, {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1}]
    if num_devices % 2 == 0 and num_devices > 2:
        meshes.append({"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 2})
    for remat in (False, True):
        for per_device in (1, 2, 4):
            for mesh in meshes:
                out.append({"model.remat": remat, "train.per_device_batch_size": per_device, **mesh})
    return out


def apply_overrides(config, overrides: dict):
    """A copy of `config` with dotted-key overrides."""
    import ml_collections

    from dreamvideo_jax import config_io

    c = ml_collections.ConfigDict(config_io.to_dict(config))
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = c
        for p in path:
            node = node[p]
        node[last] = value
    return c


def search(config, slice_: chips_lib.Slice, devices, headroom: float = DEFAULT_HEADROOM,
           compile_fn=None, log=print) -> dict:
    """Compiles every candidate (`candidates`) and returns the fitting one with the highest throughput bound
    (clips per second per chip = per-chip batch / roofline step time), with all results.

    `compile_fn(config, devices) -> (reports, facts, ...)` defaults to `compile_train`."""
    compile_fn = compile_fn or compile_train
    results = []
    for overrides in candidates(config, len(devices)):
        cfg = apply_overrides(config, overrides)
        flags = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
        try:
            reports, facts = compile_fn(cfg, devices)[:2]
        except ValueError as e:  # the mesh or batch does not fit this slice
            log(f"skip {flags}: {one_line_error(e)}")
            continue
        rep = summarize(cfg, "train", slice_, len(devices), reports, facts, headroom)
        per_chip = facts["global_batch"] / len(devices)
        rate = per_chip / rep["roofline_seconds"] if rep["roofline_seconds"] > 0 else 0.0
        results.append(dict(overrides=overrides, flags=flags, fits=rep["fits"], peak_gib=rep["peak_gib"],
                            roofline_seconds=rep["roofline_seconds"], mfu_bound=rep["mfu_bound"],
                            clips_per_second_per_chip=rate, compile_seconds=rep["compile_seconds"]))
        log(f"{'fits' if rep['fits'] else 'OOM '} peak {rep['peak_gib']:6.2f} GiB  roofline "
            f"{1e3 * rep['roofline_seconds']:8.1f} ms  {rate:7.3f} clips/s/chip  {flags}")
    fitting = [r for r in results if r["fits"]]
    best = max(fitting, key=lambda r: r["clips_per_second_per_chip"]) if fitting else None
    return dict(best=best, results=results)


def one_line_error(e: Exception) -> str:
    return " ".join(str(e).split())[:300]
