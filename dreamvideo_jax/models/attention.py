"""Scaled dot-product attention, with implementations chosen by `model.attention`.

Layout as `jax.nn.dot_product_attention`: `(B, T, N, H)` queries, `(B, S, N, H)` keys and values; outputs and
gradients come back in the input dtype, and every implementation takes the softmax in float32.
`dot_product_attention(q, k, v, is_causal, implementation)` with:

- 'closed_form' (CPU's): float32 logits and probabilities and a hand-written backward, the closed form the fused
  GPU kernels use,

      dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − rowsum(dO ∘ O)),  dQ = dS K · scale,  dK = dSᵀ Q · scale,

  with `P` saved from the forward. `jax.nn.dot_product_attention` differentiated op by op makes several passes over
  the `(B, N, T, S)` probabilities; on XLA:CPU that made the 32×32-latent self-attention the largest cost of the
  bench train step (WORKSPACE.md, Benchmarks). Saving `P` is what costs memory on an accelerator: 5 GiB for the
  level-0 self-attention of one 16-frame video at 512², 15 GiB at the sampling batch (3 guidance branches).
- 'xla': the same forward, keeping only the row log-sum-exp `(B, N, T, 1)` besides q, k, v and the output; the
  backward recomputes `P = exp(Q Kᵀ · scale − lse)` and applies the closed form (flash attention's backward,
  written as whole-matrix XLA ops that XLA fuses). Measured on XLA:TPU against `jax.nn.dot_product_attention`
  under `jax.checkpoint` (also nothing kept, `_jax_nn`), its roofline is 1.0-2.0× faster in every training case
  (benchmarks/attention_tpu.py).
- 'splash': the Pallas TPU splash-attention kernels (flash attention: the backward keeps the output and the row
  log-sum-exp and recomputes the probabilities block by block; nothing `(B, N, T, S)` is ever in HBM). Sequences
  are padded to the kernels' blocks (multiples of 128, at most 512) and padded keys are masked with segment ids
  (causal masks need none); queries are pre-scaled by 1/sqrt(H). Inside a jitted program on a mesh set with
  `jax.set_mesh` (as the Trainer does), the kernel runs per device under `jax.shard_map`: batch over the mesh's
  'data' and 'fsdp' axes and heads over 'tensor', each where it divides (an axis that does not divide is left out,
  and that dimension is computed whole on each of its devices). Without a mesh in context it is one program (for
  one device: XLA cannot partition a Pallas kernel over several, see 'auto').
  `splash_interpret()` runs the kernels in the Pallas interpreter, so tests run them on CPU.
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's fused flash attention (GPU only;
  bfloat16/float16, head size a multiple of 8 up to 128).
- 'auto': by the platform the program is built for (the context mesh's devices, else `jax.default_backend()`),
  when the call is traced, per call site:
    cpu → 'closed_form' (numerics and speed as before the other implementations existed);
    gpu → 'cudnn' where cuDNN supports the call (dtype, head size), else 'xla';
    tpu → 'splash' when there are at least SPLASH_MIN_KV = 128 keys and the head size is a multiple of 64, else
          'xla'; and 'xla' wherever a program for more than one device is traced without a context mesh (XLA
          refuses to partition a Pallas kernel, "Mosaic kernels cannot be automatically partitioned", and without
          the mesh there is nothing to shard_map over: callers that jit the model over several devices set theirs
          with `jax.set_mesh`, as the Trainer and the Sampler do).
          The rule follows XLA:TPU's compiles for v5e (benchmarks/attention_tpu.py; WORKSPACE.md, "Attention on
          TPU"): splash won every self-attention of 256 tokens or more (level 0: roofline 2.9× faster than 'xla'
          at 256² and 5.5× at 512² for the train step, 10× less temp memory; at 512² with the three sampling
          branches it is the only one XLA:TPU compiles) and the VAE's single 512-wide head; 'xla' won or tied
          with 64 tokens (level 2 at 256²), cross-attention to the 77 text tokens (1.3-2.3×), temporal attention
          over 16 frames (1.7-3×, and GiBs less temp memory: splash pads 16 to 128 both ways) and the text
          encoder's 77 causal tokens.

On TPU and GPU no implementation but 'closed_form' keeps a `(B, N, T, S)` tensor for the backward.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp

_f32 = jnp.float32

IMPLEMENTATIONS = ("auto", "closed_form", "xla", "splash", "cudnn")
CONFIG_KEY = "model.attention"

# 'auto' on TPU: splash when there are at least this many keys (see the module docstring).
SPLASH_MIN_KV = 128
SPLASH_BLOCK = 512  # largest splash block along queries and keys
_LANES = 128  # the splash kernels' key blocks are multiples of this


def check_implementation(name) -> str:
    """`name` if it is one of IMPLEMENTATIONS, else a one-line ValueError naming the config key."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{CONFIG_KEY}={name!r}; use one of {IMPLEMENTATIONS}")
    return name


# ----------------------------------------------------------------------------------------------------------------
# 'closed_form' and 'xla'


def _logits(q, k, is_causal: bool):
    """float32 `(B, N, T, S)` logits, masked above the diagonal when causal."""
    # Scale the queries, not the logits: XLA:CPU would materialise the scalar as a (B, N, T, S) operand.
    q = q.astype(_f32) * q.shape[-1] ** -0.5
    s = jnp.einsum("btnh,bsnh->bnts", q, k.astype(_f32))
    if is_causal:
        t, s_len = s.shape[-2:]
        s = jnp.where(jnp.tril(jnp.ones((t, s_len), bool)), s, jnp.finfo(_f32).min)
    return s


def _probabilities(q, k, is_causal: bool):
    return jax.nn.softmax(_logits(q, k, is_causal), axis=-1)


def _output(p, v):
    return jnp.einsum("bnts,bsnh->btnh", p, v.astype(_f32)).astype(v.dtype)


def _closed_form_grads(q, k, v, o, p, do):
    """dq, dk, dv from the probabilities `p` (see the module docstring)."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, is_causal):
    return _attention_fwd(q, k, v, is_causal)[0]  # under jit the unused residuals cost nothing


def _attention_fwd(q, k, v, is_causal):
    p = _probabilities(q, k, is_causal)
    o = _output(p, v)
    return o, (q, k, v, o, p)


def _attention_bwd(is_causal, res, do):
    del is_causal  # the saved probabilities are already zero above the diagonal
    return _closed_form_grads(*res, do)


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _xla(q, k, v, is_causal):
    return _xla_fwd(q, k, v, is_causal)[0]


def _xla_fwd(q, k, v, is_causal):
    s = _logits(q, k, is_causal)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    o = _output(e / total, v)
    return o, (q, k, v, o, m + jnp.log(total))  # the row log-sum-exp, (B, N, T, 1) float32


def _xla_bwd(is_causal, res, do):
    q, k, v, o, lse = res
    p = jnp.exp(_logits(q, k, is_causal) - lse)  # recomputed; masked logits give exactly 0
    return _closed_form_grads(q, k, v, o, p, do)


_xla.defvjp(_xla_fwd, _xla_bwd)


def _jax_nn(q, k, v, is_causal):
    """`jax.nn.dot_product_attention`'s XLA path under `jax.checkpoint` (nothing saved inside): the reference
    'xla' was measured against (benchmarks/attention_tpu.py)."""
    f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="xla")
    return jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)(q, k, v)


# ----------------------------------------------------------------------------------------------------------------
# 'cudnn'


def _cudnn_supports(q, k) -> bool:
    h = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128 and k.dtype == q.dtype


def _cudnn(q, k, v, is_causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, implementation="cudnn")


# ----------------------------------------------------------------------------------------------------------------
# 'splash'

_splash_interpret = False


@contextlib.contextmanager
def splash_interpret(on: bool = True):
    """Run the splash kernels in the Pallas interpreter (any backend, e.g. CPU tests) while active.

    Read when a program is traced: a jitted function traced before keeps the mode it was traced with."""
    global _splash_interpret
    prev, _splash_interpret = _splash_interpret, bool(on)
    try:
        yield
    finally:
        _splash_interpret = prev


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(n: int, multiple: int) -> int:
    """A block size for a sequence of n: n rounded up to `multiple`, at most SPLASH_BLOCK."""
    return min(SPLASH_BLOCK, _round_up(n, multiple))


def _splash_kernel(heads: int, t_pad: int, s_pad: int, is_causal: bool, bq: int, bkv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (t_pad, s_pad)
    mask = sa.CausalMask(shape) if is_causal else sa.FullMask(shape)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                          block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                          block_q_dq=bq, block_kv_dq=bkv)
    # Built per trace, not cached: its mask tables become constants of the program being traced.
    return sa.make_splash_mha(sa.MultiHeadMask((mask,) * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_local(q, k, v, is_causal: bool, interpret: bool):
    """Splash on one device's shard: `(B, T, N, H)` queries, `(B, S, N, H)` keys and values."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, t, n, h = q.shape
    s = k.shape[1]
    # Key blocks must be multiples of 128; so must query blocks where the backward puts queries in lanes (segment
    # ids, causal masks): keep both multiples of 128.
    bq, bkv = _block(t, _LANES), _block(s, _LANES)
    t_pad, s_pad = _round_up(t, bq), _round_up(s, bkv)
    # The kernel does not scale: fold 1/sqrt(H) into the queries (exact for H a power of 4).
    q = (q.astype(_f32) * h ** -0.5).astype(q.dtype)
    heads_first = lambda x, pad: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))
    qh, kh, vh = heads_first(q, t_pad - t), heads_first(k, s_pad - s), heads_first(v, s_pad - s)
    segments = None
    if s_pad != s and not is_causal:  # causal needs none: a real query i < T only sees keys j <= i < S
        segments = sa.SegmentIds(q=jnp.zeros((t_pad,), jnp.int32),
                                 kv=(jnp.arange(s_pad) >= s).astype(jnp.int32))
    kernel = _splash_kernel(n, t_pad, s_pad, bool(is_causal), bq, bkv, bool(interpret))
    o = jax.vmap(kernel, in_axes=(0, 0, 0, None))(qh, kh, vh, segments)
    return jnp.swapaxes(o[:, :, :t], 1, 2).astype(v.dtype)


def _mesh_specs(mesh, batch: int, heads: int):
    """PartitionSpec of `(B, T, N, H)` on `mesh`: batch over the 'data'/'fsdp' axes that divide it (in order),
    heads over 'tensor' where it divides."""
    from jax.sharding import PartitionSpec as P

    batch_axes, div = [], 1
    for a in ("data", "fsdp"):
        size = mesh.shape.get(a, 1)
        if size > 1 and batch % (div * size) == 0:
            batch_axes.append(a)
            div *= size
    t = mesh.shape.get("tensor", 1)
    head_axis = "tensor" if t > 1 and heads % t == 0 else None
    return P(tuple(batch_axes) or None, None, head_axis, None)


def _splash(q, k, v, is_causal: bool):
    interpret = _splash_interpret
    mesh = jax.sharding.get_abstract_mesh()
    local = functools.partial(_splash_local, is_causal=is_causal, interpret=interpret)
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return local(q, k, v)
    spec = _mesh_specs(mesh, q.shape[0], q.shape[2])
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _splash_supports(q, k) -> bool:
    return k.shape[1] >= SPLASH_MIN_KV and q.shape[-1] % 64 == 0


# ----------------------------------------------------------------------------------------------------------------
# Dispatch


def platform() -> str:
    """The platform programs traced now are built for: the context mesh's devices, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    name = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if name in ("cuda", "rocm") else name


def resolve(implementation: str, q, k, is_causal: bool = False) -> str:
    """The implementation a call with these shapes runs: `implementation` itself unless it is 'auto'."""
    check_implementation(implementation)
    del is_causal  # every implementation handles causal masks; kept for rules that may need it
    if implementation != "auto":
        return implementation
    p = platform()
    if p == "gpu":
        return "cudnn" if _cudnn_supports(q, k) else "xla"  # see also dot_product_attention's fallback
    if p == "tpu":
        if jax.sharding.get_abstract_mesh().empty and jax.device_count() > 1:
            return "xla"  # inputs may be sharded, and XLA cannot partition a Pallas kernel: see the docstring
        return "splash" if _splash_supports(q, k) else "xla"
    return "closed_form"


def dot_product_attention(q, k, v, is_causal: bool = False, implementation: str = "auto"):
    """softmax(Q Kᵀ / sqrt(H)) V per head; `(B, T, N, H)`, `(B, S, N, H)`, `(B, S, N, H)` -> `(B, T, N, H)`."""
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"dot_product_attention: expected q (B,T,N,H) and k, v (B,S,N,H) with the same B, N, H; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if is_causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"dot_product_attention: causal attention needs T == S; got q {q.shape}, k {k.shape}")
    is_causal = bool(is_causal)
    impl = resolve(implementation, q, k, is_causal)
    if impl == "closed_form":
        return _attention(q, k, v, is_causal)
    if impl == "xla":
        return _xla(q, k, v, is_causal)
    if impl == "cudnn":
        if platform() != "gpu":
            raise ValueError(f"{CONFIG_KEY}='cudnn' needs a GPU; this program is built for {platform()!r} "
                             f"(use 'auto', 'xla' or 'closed_form')")
        if implementation == "auto":  # cuDNN's own checks (sequence lengths, GPU generation) have the last word
            try:
                return _cudnn(q, k, v, is_causal)
            except NotImplementedError:
                return _xla(q, k, v, is_causal)
        if not _cudnn_supports(q, k):
            raise ValueError(f"{CONFIG_KEY}='cudnn': cuDNN flash attention needs bfloat16/float16 inputs and a head "
                             f"size that is a multiple of 8 up to 128; got {q.dtype}, head size {q.shape[-1]} "
                             f"(use 'auto' to fall back to 'xla' there)")
        return _cudnn(q, k, v, is_causal)
    # splash
    if platform() != "tpu" and not _splash_interpret:
        raise ValueError(f"{CONFIG_KEY}='splash' needs a TPU; this program is built for {platform()!r} (use 'auto', "
                         f"'xla' or 'closed_form', or attention.splash_interpret() to run the kernels interpreted)")
    return _splash(q, k, v, is_causal)
