"""Attention implementations compiled by XLA:TPU for a v5e chip, without a TPU: memory, FLOPs, bytes and a roofline.

  TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu PYTHONPATH=.:/path/to/libtpu_pkg \\
      python -m benchmarks.attention_tpu [--dtypes=bfloat16,float32] [--impls=closed_form,xla,splash,jax_nn]
      [--cases=self256,...] [--output=FILE.json]
  python -m benchmarks --suite=attention_tpu   (the same, with the default flags)

libtpu must be importable (an unpacked `libtpu` wheel on PYTHONPATH). `jax.experimental.topologies` gives real v5e
devices of a 2x2 topology; each program is `jax.jit(...).lower(ShapeDtypeStructs).compile()` on a one-chip
('data', 'fsdp', 'tensor') mesh set with `jax.set_mesh` (as the Trainer does), i.e. the real XLA:TPU compiler and
the Pallas/Mosaic kernel compiler, and nothing runs. Per case and implementation, in bfloat16 and float32:

* train: `value_and_grad` of the sum of one attention call's output w.r.t. q, k, v (forward + backward);
* forward: the call alone, at the sampling batch (three guidance branches).

Implementations: `model.attention`'s closed_form, xla and splash, and two references: jax_nn =
`jax.nn.dot_product_attention(implementation='xla')` under `jax.checkpoint` (keeps nothing of size (B, N, T, S)),
and jax_nn_saved = the same differentiated as it is (keeps its probabilities; not run by default). Compiles run
in worker processes, one at a time: XLA:TPU overflows its stack on some of the largest programs, which loses only
that row (reported as failed).

Reported per chip: XLA's `memory_analysis()` temp bytes, `cost_analysis()` flops, bytes accessed and
optimal_seconds (n/a where XLA gives none), the bytes the backward keeps from the forward (the residuals of
`jax.vjp`, q, k, v included), and a roofline time max(flops / 197e12, bytes / 819e9) (v5e bf16 peak and HBM
bandwidth; the same peak is used for float32). XLA's cost analysis does not look inside Pallas kernels (a Mosaic
custom call counts its operands and results once, and no FLOPs), so for 'splash' the kernels' own work is added
from the kernels' grid: 2·bq·bkv·H FLOPs per matmul per computed block (forward 2 matmuls; backward dq 3, dkv 4:
both recompute the logits), and the K/V (forward, dq) and Q/dO/lse (dkv) blocks each kernel re-reads beyond the one
read XLA counts. The roofline ignores that a 64-deep contraction uses half of v5e's 128×128 MXU (every
implementation alike) and per-kernel overheads.

Shapes are the full-size model's level-0 attention (320 channels = 5 heads of 64) at 16 frames, one video per chip
for training, three guidance branches for sampling, in the model's layouts: self-attention `(B·F, h·w)` tokens;
cross-attention `(B, F·h·w)` queries against the 77 text tokens (all frames of a sample share its context);
temporal attention `(B·h·w, F)`; the self-attention of deeper levels (640 and 1280 channels); the text
encoder's causal self-attention (77 tokens, 16 heads of 64) and the VAE's mid-block attention (one head of 512
over the latent pixels of each frame).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Optional

from benchmarks import common

PEAK_FLOPS = 197e12  # v5e dense bf16 FLOP/s per chip
HBM_BYTES_S = 819e9  # v5e HBM bandwidth per chip
TOPOLOGY = "v5e:2x2"
IMPLS = ("closed_form", "xla", "splash", "jax_nn")
DTYPES = ("bfloat16", "float32")
ENV_DEFAULTS = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    q: tuple  # (B, T, N, H)
    kv_len: int
    causal: bool
    program: str  # 'train' | 'forward'
    what: str


def _cases() -> tuple[Case, ...]:
    f, n, h = 16, 5, 64
    out = []
    for res, hw in ((256, 32 * 32), (512, 64 * 64)):
        out += [
            Case(f"self{res}", (f, hw, n, h), hw, False, "train", f"level-0 self-attention {res}², train"),
            Case(f"self{res}_fwd", (3 * f, hw, n, h), hw, False, "forward",
                 f"level-0 self-attention {res}², sampling"),
            Case(f"cross{res}", (1, f * hw, n, h), 77, False, "train", f"level-0 cross-attention {res}², train"),
            Case(f"cross{res}_fwd", (3, f * hw, n, h), 77, False, "forward",
                 f"level-0 cross-attention {res}², sampling"),
            Case(f"temporal{res}", (hw, f, n, h), f, False, "train", f"level-0 temporal attention {res}², train"),
            Case(f"temporal{res}_fwd", (3 * hw, f, n, h), f, False, "forward",
                 f"level-0 temporal attention {res}², sampling"),
        ]
    # Deeper levels' self-attention (640 / 1280 channels = 10 / 20 heads): where splash stops paying off.
    for res, level, tokens, heads in ((256, 1, 256, 10), (256, 2, 64, 20), (512, 2, 256, 20)):
        out.append(Case(f"self{res}_l{level}", (f, tokens, heads, h), tokens, False, "train",
                        f"level-{level} self-attention {res}², train"))
    out.append(Case("text", (3, 77, 16, 64), 77, True, "forward", "text encoder causal self-attention"))
    # The frozen VAE's mid-block attention (one 512-wide head over the latent pixels), encoding one clip.
    for res, hw in ((256, 32 * 32), (512, 64 * 64)):
        out.append(Case(f"vae{res}_fwd", (f, hw, 1, 512), hw, False, "forward", f"VAE mid-block attention {res}²"))
    return tuple(out)


CASES = _cases()


def _splash_kernel_work(case: Case, itemsize: int) -> tuple[float, float]:
    """(FLOPs, bytes beyond XLA's one read of the operands) of the splash kernels for `case`, per chip."""
    from dreamvideo_jax.models import attention as A

    b, t, n, h = case.q
    s = case.kv_len
    bq, bkv = A._block(t, A._LANES), A._block(s, A._LANES)
    tq, tk = A._round_up(t, bq) // bq, A._round_up(s, bkv) // bkv
    if case.causal:  # blocks with at least one key at or before a query of the block
        blocks = sum(1 for i in range(tq) for j in range(tk) if j * bkv <= (i + 1) * bq - 1)
    else:
        blocks = tq * tk
    mm = 2.0 * bq * bkv * h * blocks * b * n  # one (bq x bkv x H) matmul over every computed block
    kv_block, q_block = bkv * h * itemsize, bq * h * itemsize
    lse_block = bq * 128 * 4  # the kernels keep the row statistics 128 lanes wide in float32
    # forward: K and V re-read for every query block after the first
    extra = 2 * kv_block * tk * (tq - 1) * b * n
    flops = 2 * mm
    if case.program == "train":
        flops += 7 * mm
        extra += 2 * kv_block * tk * (tq - 1) * b * n  # dq kernel: K, V per query block
        extra += (2 * q_block + 2 * lse_block) * tq * (tk - 1) * b * n  # dkv kernel: Q, dO, lse, di per key block
    return flops, float(extra)


def _bytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def _attention_fn(impl: str, causal: bool):
    import jax

    from dreamvideo_jax.models import attention as A

    if impl == "jax_nn":  # references: jax.nn.dot_product_attention's XLA path, rematerialised (no probabilities
        return lambda q, k, v: A._jax_nn(q, k, v, causal)  # kept) and as autodiff differentiates it (kept)
    if impl == "jax_nn_saved":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    return lambda q, k, v: A.dot_product_attention(q, k, v, causal, impl)


def compile_case(case: Case, impl: str, dtype: str, mesh, batch_axes=()) -> dict:
    """Compiles `case` with `impl` in `dtype` on `mesh` (batch split over `batch_axes`); per-chip numbers."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    b, t, n, h = case.q
    scale = 1
    for a in batch_axes:
        scale *= mesh.shape[a]
    sharding = NamedSharding(mesh, P(tuple(batch_axes) or None))
    dt = jnp.dtype(dtype)
    q = jax.ShapeDtypeStruct((b * scale, t, n, h), dt, sharding=sharding)
    kv = jax.ShapeDtypeStruct((b * scale, case.kv_len, n, h), dt, sharding=sharding)
    attn = _attention_fn(impl, case.causal)
    if case.program == "train":
        fn = jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    else:
        fn = attn
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(q, kv, kv).compile()
        saved = None
        if case.program == "train":
            saved = _bytes(jax.eval_shape(lambda q, k, v: jax.vjp(attn, q, k, v)[1], q, kv, kv)) // scale
    seconds = time.perf_counter() - t0
    ca = compiled.cost_analysis()
    ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
    mem = common.compiled_memory(compiled)
    flops, nbytes = float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))
    kernel_flops = kernel_bytes = 0.0
    if impl == "splash":
        kernel_flops, kernel_bytes = _splash_kernel_work(case, dt.itemsize)
    total_flops, total_bytes = flops + kernel_flops, nbytes + kernel_bytes
    return {
        "case": case.name, "impl": impl, "dtype": dtype, "program": case.program,
        "q": list(case.q), "kv_len": case.kv_len, "causal": case.causal, "batch_axes": list(batch_axes),
        "compile_s": round(seconds, 2),
        "temp_bytes": mem.get("temp_size_in_bytes"),
        "saved_bytes": saved,
        "xla_flops": flops, "xla_bytes": nbytes,
        "kernel_flops": kernel_flops, "kernel_bytes": kernel_bytes,
        "optimal_seconds": float(ca.get("optimal_seconds", -1.0)),
        "roofline_s": max(total_flops / PEAK_FLOPS, total_bytes / HBM_BYTES_S),
        "bound": "flops" if total_flops / PEAK_FLOPS >= total_bytes / HBM_BYTES_S else "bytes",
    }


def _auto_choice(case: Case, dtype: str, mesh) -> str:
    import jax
    import jax.numpy as jnp

    from dreamvideo_jax.models import attention as A

    q = jax.ShapeDtypeStruct(case.q, jnp.dtype(dtype))
    k = jax.ShapeDtypeStruct((case.q[0], case.kv_len) + case.q[2:], jnp.dtype(dtype))
    with jax.set_mesh(mesh):
        return A.resolve("auto", q, k, case.causal)


def tpu_mesh(topology: str = TOPOLOGY, shape=(1, 1, 1)):
    """A ('data', 'fsdp', 'tensor') mesh of `shape` over the first devices of a TPU `topology` (no TPU needed)."""
    import math

    import jax
    import numpy as np
    from jax.experimental import topologies

    from dreamvideo_jax.parallel.mesh import MESH_AXES

    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.sharding.Mesh(np.asarray(devices[:math.prod(shape)]).reshape(shape), MESH_AXES, axis_types=auto)


def _job_row(job: dict, meshes: dict) -> dict:
    case = next(c for c in CASES if c.name == job["case"])
    shape = tuple(job.get("mesh", (1, 1, 1)))
    if shape not in meshes:
        meshes[shape] = tpu_mesh(job["topology"], shape)
    mesh = meshes[shape]
    try:
        r = compile_case(case, job["impl"], job["dtype"], mesh, tuple(job.get("batch_axes", ())))
    except Exception as e:  # noqa: BLE001 - a failed compile is a result too
        r = {"case": case.name, "impl": job["impl"], "dtype": job["dtype"], "error": f"{type(e).__name__}: {e}"[:300]}
    r["auto"] = _auto_choice(case, job["dtype"], mesh)
    return r


def _worker(jobs: list, out_path: str) -> None:
    """Compiles `jobs` in order, appending each row to `out_path` (JSON lines) as soon as it is done."""
    import json

    meshes: dict = {}
    for job in jobs:
        r = _job_row(job, meshes)
        with open(out_path, "a") as f:
            f.write(json.dumps({**r, "job": job}) + "\n")
        print(f"{r['case']:>18} {r['dtype']:>8} {r['impl']:>12}: "
              + (r["error"] if "error" in r else f"{r['compile_s']:.1f} s compile"), flush=True)


def _crash_reason(stderr: str) -> str:
    lines = [x.strip() for x in stderr.splitlines()]
    if any("STACK OVERFLOW" in x for x in lines):
        where = next((x.split()[-1] for x in lines if x.startswith("PC: @")), "")
        return f"XLA:TPU compiler stack overflow (SIGSEGV){' in ' + where if where else ''}"
    hit = [x for x in lines if ("Error" in x or "SIG" in x) and "WARNING" not in x]
    return (hit or lines or [""])[-1][:200]


def _run_jobs(jobs: list) -> list:
    """Every job in a worker process, one process at a time: a compiler crash (XLA:TPU overflows its stack on some
    of the largest XLA programs) loses only the job it happened in, which is recorded as failed."""
    import json
    import subprocess
    import tempfile

    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in {**ENV_DEFAULTS, "JAX_PLATFORMS": "cpu"}.items()}}
    rows, remaining = [], list(jobs)
    while remaining:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.jsonl")
            cmd = [sys.executable, "-m", "benchmarks.attention_tpu", "--worker_jobs=" + json.dumps(remaining),
                   "--worker_out=" + out]
            with open(os.path.join(tmp, "stderr"), "w+") as err:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
                for line in proc.stdout:  # the worker's progress lines, as they come
                    common.log(line.rstrip())
                proc.wait()
                err.seek(0)
                stderr = err.read()
            done = [json.loads(x) for x in open(out)] if os.path.exists(out) else []
        rows += [{k: v for k, v in r.items() if k != "job"} for r in done]
        remaining = remaining[len(done):]
        if remaining and proc.returncode != 0:
            job = remaining.pop(0)
            rows.append({"case": job["case"], "impl": job["impl"], "dtype": job["dtype"], "auto": None,
                         "error": f"compiler process died (exit {proc.returncode}): {_crash_reason(stderr)}"})
            common.log(f"{job['case']:>18} {job['dtype']:>8} {job['impl']:>12}: {rows[-1]['error']}")
        elif remaining:
            raise RuntimeError(f"attention_tpu worker stopped early: {_crash_reason(stderr)}")
    return rows


def run(impls=IMPLS, dtypes=DTYPES, cases: Optional[tuple] = None, topology: str = TOPOLOGY,
        sharded_check: bool = True) -> dict:
    t_all = time.perf_counter()
    chosen = [c for c in CASES if cases is None or c.name in cases]
    jobs = [dict(case=c.name, dtype=d, impl=i, topology=topology) for c in chosen for d in dtypes for i in impls]
    if sharded_check:
        # The splash kernel under shard_map: 4 chips with data=2, fsdp=2 and 4x the batch keep the per-chip numbers.
        jobs += [dict(case="self256", dtype="bfloat16", impl="splash", topology=topology, mesh=(2, 2, 1),
                      batch_axes=("data", "fsdp"))]
    rows = _run_jobs(jobs)
    out = {"topology": topology, "peak_flops": PEAK_FLOPS, "hbm_bytes_s": HBM_BYTES_S,
           "rows": [r for r in rows if not r.get("batch_axes")],
           "sharded": [r for r in rows if r.get("batch_axes")],
           "cases": {c.name: c.what for c in chosen}}
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    return out


def _fmt_bytes(b) -> str:
    return "-" if b is None else common.gib(b)


def print_table(res: dict) -> None:
    print(f"\n== attention on TPU ({res['topology']}, XLA:TPU compile, per chip; roofline = max(flops / "
          f"{res['peak_flops'] / 1e12:.0f}e12, bytes / {res['hbm_bytes_s'] / 1e9:.0f}e9))")
    head = (f"{'case':>16} {'dtype':>8} {'impl':>12} {'temp':>11} {'saved (bwd)':>11} {'GFLOP':>8} "
            f"{'GB accessed':>11} {'XLA opt ms':>10} {'roofline ms':>11}  bound  auto")
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        if "error" in r:
            print(f"{r['case']:>16} {r['dtype']:>8} {r['impl']:>12}  failed: {r['error'][:90]}")
            continue
        opt = f"{1e3 * r['optimal_seconds']:.3f}" if r["optimal_seconds"] > 0 else "n/a"
        gflop = (r["xla_flops"] + r["kernel_flops"]) / 1e9
        gb = (r["xla_bytes"] + r["kernel_bytes"]) / 1e9
        mark = "*" if r["impl"] == r.get("auto") else ""
        print(f"{r['case']:>16} {r['dtype']:>8} {r['impl']:>12} {_fmt_bytes(r['temp_bytes']):>11} "
              f"{_fmt_bytes(r['saved_bytes']):>11} {gflop:>8.1f} {gb:>11.2f} {opt:>10} "
              f"{1e3 * r['roofline_s']:>11.3f}  {r['bound']:<5}  {mark}")
    for r in res.get("sharded", []):
        if "error" in r:
            print(f"sharded check failed: {r['error']}")
            continue
        print(f"sharded check: {r['case']} {r['impl']} {r['dtype']} {r['program']} on 4 chips, batch over "
              f"{'+'.join(r['batch_axes'])} (4x the batch): per chip temp {_fmt_bytes(r['temp_bytes'])}, saved "
              f"{_fmt_bytes(r['saved_bytes'])}, {r['xla_bytes'] / 1e9:.2f} GB accessed by XLA's count "
              f"(compare the one-chip row)")
    print(f"(* = what model.attention='auto' picks on TPU; wall {res['wall_s']:.0f} s)")


def main(argv=None) -> dict:
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_list("impls", list(IMPLS), "Implementations: closed_form, xla, splash, and the references jax_nn "
                      "(jax.nn.dot_product_attention under jax.checkpoint) and jax_nn_saved (differentiated as it is).",
                      flag_values=fv)
    flags.DEFINE_list("dtypes", list(DTYPES), "Input dtypes.", flag_values=fv)
    flags.DEFINE_list("cases", [], "Cases (default all): " + ", ".join(c.name for c in CASES), flag_values=fv)
    flags.DEFINE_string("topology", TOPOLOGY, "TPU topology name for jax.experimental.topologies.", flag_values=fv)
    flags.DEFINE_bool("sharded_check", True, "Also compile splash on a 4-chip mesh (data=2, fsdp=2).",
                      flag_values=fv)
    flags.DEFINE_string("output", "", "Write the results as JSON to this file.", flag_values=fv)
    flags.DEFINE_string("worker_jobs", "", "Internal: JSON list of jobs for a worker process.", flag_values=fv)
    flags.DEFINE_string("worker_out", "", "Internal: where a worker appends its rows.", flag_values=fv)
    fv(["attention_tpu"] + list(argv or []))
    if fv.worker_jobs:
        import json

        _worker(json.loads(fv.worker_jobs), fv.worker_out)
        return {}
    res = run(tuple(fv.impls), tuple(fv.dtypes), tuple(fv.cases) or None, fv.topology, fv.sharded_check)
    print_table(res)
    if fv.output:
        common.write_json(fv.output, res)
        print(f"\nwrote {fv.output}")
    return res


if __name__ == "__main__":
    for _k, _v in {**ENV_DEFAULTS, "JAX_PLATFORMS": "cpu"}.items():
        os.environ.setdefault(_k, _v)
    main(sys.argv[1:])
