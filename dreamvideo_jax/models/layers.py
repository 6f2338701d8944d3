"""Building blocks shared by the 3D U-Net, the retention branch, the VAE and the text encoder.

Layouts are channels-last. Spatial layers see frames as batch, `(B*F, H, W, C)` in batch-major order
(b0f0, b0f1, ...); temporal layers see `(B, F, H, W, C)`. Module and parameter names follow diffusers after
the rule `name.N -> name_N`, so converting PyTorch weights is a mechanical rename plus a transpose.

Every epsilon is explicit (they differ per layer in the reference) and every parameter carries logical axis
names from `dreamvideo_jax.parallel.axes`.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamvideo_jax.models.attention import dot_product_attention
from dreamvideo_jax.models.remat import remat
from dreamvideo_jax.parallel import axes as ax

Dtype = Any

# PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) == variance_scaling(1/3, fan_in, uniform).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


def _part(init, names):
    return nn.with_logical_partitioning(init, tuple(names))


def dense(
    features: int,
    name: Optional[str],
    *,
    use_bias: bool = True,
    zero_init: bool = False,
    axes: tuple[str, str] = (ax.EMBED, ax.MLP),
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_part(zeros if zero_init else torch_default_init, axes),
        bias_init=_part(zeros, (axes[1],)),
        name=name,
    )


def conv(
    features: int,
    kernel_size: Sequence[int],
    name: Optional[str],
    *,
    strides: Optional[Sequence[int]] = None,
    padding: Any = None,
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.Conv:
    """A convolution with PyTorch-style explicit symmetric padding (k//2 on each side) unless given."""
    kernel_size = tuple(kernel_size)
    if padding is None:
        padding = tuple((k // 2, k // 2) for k in kernel_size)
    kernel_axes = (ax.KERNEL_SPACE,) * len(kernel_size) + (ax.CONV_IN, ax.CONV_OUT)
    return nn.Conv(
        features,
        kernel_size,
        strides=strides,
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_part(zeros if zero_init else torch_default_init, kernel_axes),
        bias_init=_part(zeros, (ax.CONV_OUT,)),
        name=name,
    )


def group_norm(groups: int, eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.GroupNorm:
    """GroupNorm pooling over every axis but the first: per frame on (B*F,H,W,C), over frames on (B,F,H,W,C)."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=_part(ones, (ax.NORM,)),
        bias_init=_part(zeros, (ax.NORM,)),
        name=name,
    )


def layer_norm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=_part(ones, (ax.NORM,)),
        bias_init=_part(zeros, (ax.NORM,)),
        name=name,
    )


def gelu(x):
    """Exact (erf) GELU, as torch's `F.gelu` / `nn.GELU()`; flax's default is the tanh approximation.

    Written as torch writes it, `x/2 · (1 + erf(x/√2))`: `jax.nn.gelu(approximate=False)` goes through `erfc`,
    which XLA:CPU expands into two branches and an exponential (the bench train step's GEGLU elementwise forward
    took 357 ms of op time that way, 253 ms this way; WORKSPACE.md, Benchmarks)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def constrain(x, names):
    """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, names)


def constrain_frames(x):
    return constrain(x, (ax.ACT_BATCH, ax.ACT_HEIGHT, ax.ACT_WIDTH, ax.ACT_EMBED))


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0):
    """Sinusoidal embedding (diffusers `get_timestep_embedding`): [cos, sin] when `flip_sin_to_cos`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.features, "linear_1", **kw)(x)
        return dense(self.features, "linear_2", axes=(ax.MLP, ax.EMBED), **kw)(nn.silu(x))


class AttentionPooling(nn.Module):
    """Attention pooling of a sequence into one vector (diffusers `AttentionPooling`): the query is the mean token
    plus a learnt `positional_embedding`; it attends over itself and every token with `num_heads` heads, and the
    heads' outputs are concatenated (no output projection). `(B, L, D)` -> `(B, D)`."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # implementation (models/attention.py; config key model.attention)

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, _, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"AttentionPooling: width {d} is not divisible by num_heads {self.num_heads}")
        pos_init = lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / math.sqrt(shape[-1])
        pos = self.param("positional_embedding", _part(pos_init, (ax.POSITION, ax.EMBED)), (1, d), self.param_dtype)
        query = jnp.mean(x, axis=1, keepdims=True) + pos.astype(self.dtype)
        x = jnp.concatenate([query, x], axis=1)
        proj = lambda name, y: dense(d, name, axes=(ax.EMBED, ax.HEADS), **kw)(y).reshape(
            b, y.shape[1], self.num_heads, d // self.num_heads)
        pooled = dot_product_attention(proj("q_proj", query), proj("k_proj", x), proj("v_proj", x),
                                       implementation=self.attention)
        return pooled.reshape(b, d)


class TextTimeEmbedding(nn.Module):
    """The caption pooled into one vector that is added to the time embedding (diffusers `TextTimeEmbedding`,
    UNet2DConditionModel's `addition_embed_type="text"`): LayerNorm -> attention pooling -> Linear -> LayerNorm.
    `(B, L, D)` text context -> `(B, features)`."""

    features: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # see AttentionPooling

    @nn.compact
    def __call__(self, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layer_norm(1e-5, "norm1", **kw)(context.astype(self.dtype))
        x = AttentionPooling(self.num_heads, name="pool", attention=self.attention, **kw)(x)
        x = dense(self.features, "proj", **kw)(x)
        return layer_norm(1e-5, "norm2", **kw)(x)


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out_0`).

    With `norm_groups` set it is the VAE's mid-block attention: GroupNorm (`group_norm`) on a
    `(N, H, W, C)` input, attention over the H*W positions, and a residual connection.
    """

    heads: int
    dim_head: int
    qkv_bias: bool = False
    is_causal: bool = False
    norm_groups: Optional[int] = None
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # implementation (models/attention.py; config key model.attention)

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual, image_shape = x, None
        if self.norm_groups is not None:
            image_shape = x.shape
            x = group_norm(self.norm_groups, self.norm_eps, "group_norm", **kw)(x)
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        context = x if context is None else context
        batch = x.shape[0]
        if context.shape[0] != batch:
            # One context for each group of consecutive rows (e.g. the frames of a sample): attend per query
            # row exactly as with a repeated context, projecting keys and values once per group.
            if batch % context.shape[0]:
                raise ValueError(f"context batch {context.shape[0]} does not divide query batch {batch}")
            x = x.reshape((context.shape[0], -1) + x.shape[2:])
        out_dim = x.shape[-1]
        inner = self.heads * self.dim_head
        proj = lambda name, y: dense(inner, name, use_bias=self.qkv_bias, axes=(ax.EMBED, ax.HEADS), **kw)(y)
        q, k, v = proj("to_q", x), proj("to_k", context), proj("to_v", context)
        split = lambda y: y.reshape(y.shape[:-1] + (self.heads, self.dim_head))
        o = dot_product_attention(split(q), split(k), split(v), is_causal=self.is_causal,
                                  implementation=self.attention)
        o = o.reshape(o.shape[:-2] + (inner,))
        o = dense(out_dim, "to_out_0", axes=(ax.HEADS, ax.EMBED), **kw)(o)
        if o.shape[0] != batch:
            o = o.reshape((batch, -1) + o.shape[2:])
        if image_shape is not None:
            o = o.reshape(image_shape) + residual
        return o


class GEGLU(nn.Module):
    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = dense(2 * self.inner, "proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward: `net_0` (GEGLU, dim -> 2*4*dim) then `net_2` (4*dim -> dim)."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        h = GEGLU(self.mult * dim, name="net_0", **kw)(x)
        return dense(dim, "net_2", axes=(ax.MLP, ax.EMBED), **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, then cross-attention to `context` (or a second self-attention), then GEGLU FF.

    `remat_policy` (a `jax.checkpoint_policies` name) makes each attention and the feed-forward a separate
    rematerialisation region (the U-Net's finest remat granularity); None: no remat.
    """

    heads: int
    dim_head: int
    double_self_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: Optional[str] = None
    attention: str = "auto"  # see Attention

    @nn.compact
    def __call__(self, x, context=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda name: remat(Attention, self.remat_policy)(self.heads, self.dim_head, name=name,
                                                                attention=self.attention, **kw)
        x = attn("attn1")(layer_norm(1e-5, "norm1", **kw)(x)) + x
        ctx = None if self.double_self_attention else context
        x = attn("attn2")(layer_norm(1e-5, "norm2", **kw)(x), ctx) + x
        ff = remat(FeedForward, self.remat_policy)(name="ff", **kw)
        return ff(layer_norm(1e-5, "norm3", **kw)(x)) + x


class Transformer2D(nn.Module):
    """Spatial transformer on `(N, H, W, C)`: GroupNorm(eps 1e-6) -> linear proj_in -> block -> proj_out + x."""

    heads: int
    dim_head: int
    norm_groups: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: Optional[str] = None  # see BasicTransformerBlock
    attention: str = "auto"  # see Attention

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n, h, w, c = x.shape
        inner = self.heads * self.dim_head
        y = group_norm(self.norm_groups, 1e-6, "norm", **kw)(x).reshape(n, h * w, c)
        y = dense(inner, "proj_in", **kw)(y)
        y = BasicTransformerBlock(self.heads, self.dim_head, name="transformer_blocks_0",
                                  remat_policy=self.remat_policy, attention=self.attention, **kw)(y, context)
        y = dense(c, "proj_out", axes=(ax.MLP, ax.EMBED), **kw)(y)
        return y.reshape(n, h, w, c) + x


class TransformerTemporal(nn.Module):
    """Temporal transformer on frames-as-batch input `(B*F, H, W, C)`: attention over F at each pixel.

    GroupNorm pools over frames (applied to `(B, F, H, W, C)`); `attn2` is a second self-attention; there is
    no positional embedding. `proj_out` is zero-initialised (as ModelScope does) so a new layer is identity.
    """

    heads: int
    dim_head: int
    norm_groups: int
    num_frames: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: Optional[str] = None  # see BasicTransformerBlock
    attention: str = "auto"  # see Attention

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bf, h, w, c = x.shape
        f = self.num_frames
        b = bf // f
        inner = self.heads * self.dim_head
        y = group_norm(self.norm_groups, 1e-6, "norm", **kw)(x.reshape(b, f, h, w, c))
        y = y.transpose(0, 2, 3, 1, 4).reshape(b * h * w, f, c)
        y = dense(inner, "proj_in", **kw)(y)
        y = BasicTransformerBlock(
            self.heads, self.dim_head, double_self_attention=True, name="transformer_blocks_0",
            remat_policy=self.remat_policy, attention=self.attention, **kw
        )(y)
        y = dense(c, "proj_out", zero_init=True, axes=(ax.MLP, ax.EMBED), **kw)(y)
        y = y.reshape(b, h, w, f, c).transpose(0, 3, 1, 2, 4).reshape(bf, h, w, c)
        return y + x


class ResnetBlock(nn.Module):
    """diffusers `ResnetBlock2D`: GN-SiLU-conv, + time embedding, GN-SiLU-(dropout)-conv, + shortcut."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, self.eps, "norm1", **kw)(x))
        h = conv(self.out_channels, (3, 3), "conv1", **kw)(h)
        if temb is not None:
            t = dense(self.out_channels, "time_emb_proj", axes=(ax.MLP, ax.EMBED), **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2", **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
        h = conv(self.out_channels, (3, 3), "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, (1, 1), "conv_shortcut", **kw)(x)
        return x + h


class TemporalConv(nn.Module):
    """Conv3d with kernel (3,1,1) and zero padding (1,0,0) over frames of `(B, F, H, W, C)`.

    Same parameters as `nn.Conv(kernel_size=(3, 1, 1))` (`kernel` (3,1,1,I,O), `bias`), computed as one matmul
    over the three frame-shifted copies concatenated on channels: on XLA CPU this is ~1.5x faster forward and
    ~2.5x faster forward+backward than the 3D convolution (WORKSPACE.md).
    """

    features: int
    zero_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        axes = (ax.KERNEL_SPACE,) * 3 + (ax.CONV_IN, ax.CONV_OUT)
        init = zeros if self.zero_init else torch_default_init
        kernel = self.param("kernel", _part(init, axes), (3, 1, 1, c, self.features), self.param_dtype)
        bias = self.param("bias", _part(zeros, (ax.CONV_OUT,)), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        f = x.shape[1]
        xp = jnp.pad(x, ((0, 0), (1, 1)) + ((0, 0),) * (x.ndim - 2))
        shifted = jnp.concatenate([xp[:, 0:f], xp[:, 1:f + 1], xp[:, 2:f + 2]], axis=-1)
        return shifted @ kernel.reshape(3 * c, self.features) + bias


class TemporalConvLayer(nn.Module):
    """Four (GroupNorm -> SiLU -> [Dropout] -> Conv3d (3,1,1)) stages over frames, plus identity.

    Input is frames-as-batch `(B*F, H, W, C)`; the norms pool over frames. Names follow diffusers'
    Sequential indices (`conv1_0` norm, `conv1_2` conv; `conv{2,3,4}_0` norm, `conv{2,3,4}_3` conv).
    `conv4_3` is zero-initialised so a new layer is the identity.
    """

    num_frames: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.1
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bf, h, w, c = x.shape
        f = self.num_frames
        identity = x.reshape(bf // f, f, h, w, c)
        y = identity
        for stage in range(1, 5):
            y = nn.silu(group_norm(self.groups, self.eps, f"conv{stage}_0", **kw)(y))
            if stage > 1:
                y = nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
            name = "conv1_2" if stage == 1 else f"conv{stage}_3"
            y = TemporalConv(c, zero_init=stage == 4, name=name, **kw)(y)
        return (identity + y).reshape(bf, h, w, c)


class Downsample(nn.Module):
    """3x3 stride-2 conv named `conv`; `padding=1` pads (1,1) like torch, `padding=0` pads (0,1) (VAE)."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return conv(self.out_channels, (3, 3), "conv", strides=(2, 2), padding=pad,
                    dtype=self.dtype, param_dtype=self.param_dtype)(x)


def nearest_resize(x, size: tuple[int, int]):
    """torch `F.interpolate(mode="nearest")` on `(N, H, W, C)`: source index floor(i * in / out)."""
    n, h, w, c = x.shape
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(size[0]) * h) // size[0]
    cols = (jnp.arange(size[1]) * w) // size[1]
    return x[:, rows][:, :, cols]


class Upsample(nn.Module):
    """Nearest x2 (or to `size`, for odd skip sizes) then a 3x3 conv named `conv`."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: Optional[tuple[int, int]] = None):
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        x = nearest_resize(x, tuple(size))
        return conv(self.out_channels, (3, 3), "conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)
