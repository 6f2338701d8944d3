"""The ModelScope-T2V 3D U-Net (diffusers `UNet3DConditionModel`) in Flax, channels-last.

`UNet3D(config)(sample, timesteps, context)` takes video latents `(B, F, H, W, C)`, timesteps `(B,)` (or a
scalar) and text embeddings `(B, L, D)` and returns `(B, F, H, W, out_channels)`. It accepts ControlNet-style
residuals: `down_block_additional_residuals` (one per skip tensor, 12 for the full model) and
`mid_block_additional_residual`, all in video layout `(B, F, h, w, c)`; they are added to the skips and to the
mid-block output before the up path, as diffusers does.

The input half of the network (conv_in, time embedding, transformer_in, down blocks, mid block) is built by
`encoder_forward`, which the image-retention branch reuses so both have the same structure and names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dreamvideo_jax.models import layers as L
from dreamvideo_jax.parallel import axes as ax

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock3D", "DownBlock3D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock3D", "UpBlock3D"


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of the 3D U-Net; field names and defaults are diffusers' (defaults = ms-1.7b)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1024
    attention_head_dim: int = 64  # per-head size; heads = channels // attention_head_dim
    transformer_in_heads: int = 8  # transformer_in: 8 heads of attention_head_dim
    temporal_dropout: float = 0.1  # dropout inside temporal convs (diffusers/ModelScope)
    resnet_dropout: float = 0.0
    # Optional, off in ModelScope: "text" adds the attention-pooled caption to the time embedding (diffusers
    # UNet2DConditionModel's `addition_embed_type="text"`, parameters `add_embedding.*`), a global text pathway
    # into every ResNet block besides cross-attention.
    addition_embed_type: Optional[str] = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for f in ("block_out_channels", "down_block_types", "up_block_types"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNetConfig: down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length")
        for t in self.down_block_types:
            if t not in (CROSS_DOWN, PLAIN_DOWN):
                raise ValueError(f"UNetConfig: unknown down block type {t!r}; use {CROSS_DOWN} or {PLAIN_DOWN}")
        if self.addition_embed_type not in (None, "text"):
            raise ValueError(f"UNetConfig: addition_embed_type={self.addition_embed_type!r}; use None or 'text'")
        if self.addition_embed_type and self.cross_attention_dim % self.addition_embed_type_num_heads:
            raise ValueError(f"UNetConfig: cross_attention_dim {self.cross_attention_dim} not divisible by "
                             f"addition_embed_type_num_heads {self.addition_embed_type_num_heads}")
        for t in self.up_block_types:
            if t not in (CROSS_UP, PLAIN_UP):
                raise ValueError(f"UNetConfig: unknown up block type {t!r}; use {CROSS_UP} or {PLAIN_UP}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"UNetConfig: block_out_channels {c} not divisible by norm_num_groups "
                                 f"{self.norm_num_groups}")
            if c % self.attention_head_dim:
                raise ValueError(f"UNetConfig: block_out_channels {c} not divisible by attention_head_dim "
                                 f"{self.attention_head_dim}")

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction of the deepest level (latent sizes should be multiples of it; others work too)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def num_skips(self) -> int:
        """Number of skip tensors = number of `down_block_additional_residuals`."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + (n - 1)

    def skip_channels(self) -> list[int]:
        ch = [self.block_out_channels[0]]
        for i, c in enumerate(self.block_out_channels):
            ch += [c] * self.layers_per_block
            if i < len(self.block_out_channels) - 1:
                ch.append(c)
        return ch



@dataclasses.dataclass(frozen=True)
class Runtime:
    """Non-architectural knobs shared by every block: dtypes, training mode, remat, attention implementation.

    With `remat` on, every ResnetBlock and TemporalConvLayer, and inside every transformer (`transformer_in`
    included) each attention and the feed-forward, is a rematerialisation region (`models/remat.py`; policy
    `remat_policy`): the backward keeps only the regions' inputs and recomputes one region at a time.
    Checkpointing whole down/mid/up blocks with `nn.remat` instead saved no memory (1.00x): XLA:CPU drops the
    CSE barriers, and a block's recompute holds all its internals (WORKSPACE.md, benchmark section).
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    deterministic: bool = True
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "auto"  # models/attention.py; config key model.attention

    @property
    def kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def policy(self) -> Optional[str]:
        """The remat policy name when remat is on, else None (what `L.remat` and the transformers take)."""
        return self.remat_policy if self.remat else None

    def wrap(self, cls):
        """`nn.remat(cls)` with the configured policy when remat is on (parameter names are unchanged)."""
        return L.remat(cls, self.policy)


def _layer(cfg: UNetConfig, rt: Runtime, i: int, x, temb, context, out_channels: int, num_frames: int,
           has_attn: bool):
    """resnets_i -> temp_convs_i [-> attentions_i -> temp_attentions_i], created under the calling module."""
    heads = out_channels // cfg.attention_head_dim
    x = rt.wrap(L.ResnetBlock)(out_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.resnet_dropout,
                               rt.deterministic, name=f"resnets_{i}", **rt.kw)(x, temb)
    x = rt.wrap(L.TemporalConvLayer)(num_frames, cfg.norm_num_groups, 1e-5, cfg.temporal_dropout,
                                     rt.deterministic, name=f"temp_convs_{i}", **rt.kw)(x)
    if has_attn:
        x = L.Transformer2D(heads, cfg.attention_head_dim, cfg.norm_num_groups, name=f"attentions_{i}",
                            remat_policy=rt.policy, attention=rt.attention, **rt.kw)(x, context)
        x = L.TransformerTemporal(heads, cfg.attention_head_dim, cfg.norm_num_groups, num_frames,
                                  name=f"temp_attentions_{i}", remat_policy=rt.policy, attention=rt.attention,
                                  **rt.kw)(x)
    return L.constrain_frames(x)


class DownBlock3D(nn.Module):
    """CrossAttnDownBlock3D (has_attn) or DownBlock3D; returns (h, skip tensors)."""

    cfg: UNetConfig
    rt: Runtime
    out_channels: int
    num_frames: int
    has_attn: bool
    add_downsample: bool

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.cfg.layers_per_block):
            x = _layer(self.cfg, self.rt, i, x, temb, context, self.out_channels, self.num_frames,
                       self.has_attn)
            skips.append(x)
        if self.add_downsample:
            x = L.Downsample(self.out_channels, padding=1, name="downsamplers_0", **self.rt.kw)(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock3D(nn.Module):
    """UNetMidBlock3DCrossAttn: resnet0 -> temp_conv0 -> attn -> temp_attn -> resnet1 -> temp_conv1."""

    cfg: UNetConfig
    rt: Runtime
    num_frames: int

    @nn.compact
    def __call__(self, x, temb, context):
        cfg, rt = self.cfg, self.rt
        c = x.shape[-1]
        heads = c // cfg.attention_head_dim
        resnet, temp_conv = rt.wrap(L.ResnetBlock), rt.wrap(L.TemporalConvLayer)
        x = resnet(c, cfg.norm_num_groups, cfg.norm_eps, cfg.resnet_dropout, rt.deterministic,
                   name="resnets_0", **rt.kw)(x, temb)
        x = temp_conv(self.num_frames, cfg.norm_num_groups, 1e-5, cfg.temporal_dropout,
                      rt.deterministic, name="temp_convs_0", **rt.kw)(x)
        x = L.Transformer2D(heads, cfg.attention_head_dim, cfg.norm_num_groups, name="attentions_0",
                            remat_policy=rt.policy, attention=rt.attention, **rt.kw)(x, context)
        x = L.TransformerTemporal(heads, cfg.attention_head_dim, cfg.norm_num_groups, self.num_frames,
                                  name="temp_attentions_0", remat_policy=rt.policy, attention=rt.attention,
                                  **rt.kw)(x)
        x = resnet(c, cfg.norm_num_groups, cfg.norm_eps, cfg.resnet_dropout, rt.deterministic,
                   name="resnets_1", **rt.kw)(x, temb)
        x = temp_conv(self.num_frames, cfg.norm_num_groups, 1e-5, cfg.temporal_dropout,
                      rt.deterministic, name="temp_convs_1", **rt.kw)(x)
        return L.constrain_frames(x)


class UpBlock3D(nn.Module):
    """CrossAttnUpBlock3D (has_attn) or UpBlock3D: concat a skip before each of layers_per_block+1 layers."""

    cfg: UNetConfig
    rt: Runtime
    out_channels: int
    num_frames: int
    has_attn: bool
    upsample_size: Optional[tuple[int, int]]  # None: no upsampler

    @nn.compact
    def __call__(self, x, temb, context, skips):
        for i, skip in enumerate(reversed(skips)):
            x = jnp.concatenate([x, skip], axis=-1)
            x = _layer(self.cfg, self.rt, i, x, temb, context, self.out_channels, self.num_frames,
                       self.has_attn)
        if self.upsample_size is not None:
            x = L.Upsample(self.out_channels, name="upsamplers_0", **self.rt.kw)(x, self.upsample_size)
        return x


def _frames_as_batch(x):
    b, f = x.shape[:2]
    return x.reshape((b * f,) + x.shape[2:])


def _check_video(name, x, cfg_channels=None):
    if x.ndim != 5:
        raise ValueError(f"{name} must be a video (B, F, H, W, C); got shape {tuple(x.shape)}")
    if cfg_channels is not None and x.shape[-1] != cfg_channels:
        raise ValueError(f"{name} has {x.shape[-1]} channels; the model expects {cfg_channels}")


def encoder_forward(cfg: UNetConfig, rt: Runtime, sample, timesteps, context, extra_input=None):
    """conv_in (+ extra_input) -> transformer_in -> down blocks -> mid block, under the calling module.

    Must be called from inside a compact method: submodules are named as in diffusers
    (`conv_in`, `time_embedding`, `transformer_in`, `down_blocks_i`, `mid_block`).

    Args:
      sample: `(B, F, H, W, C_in)` latents.
      timesteps: `(B,)` or scalar.
      context: `(B, L, D)` text embeddings.
      extra_input: optional features added after conv_in (retention branch): `(B, H, W, C0)` to every frame, or
        `(B, F, H, W, C0)` per frame.

    Returns:
      (h, skips, temb, context): mid output and skip tensors as `(B*F, h, w, c)`, the per-frame time
      embedding (repeated over frames, batch-major) and the text context `(B, L, D)`. The context is not
      repeated per frame: cross-attention lets all frames of a sample attend to its one context (the same
      result as diffusers' per-frame copies, with F times fewer key/value projections).
    """
    _check_video("sample", sample, cfg.in_channels)
    b, f = sample.shape[:2]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    c0 = cfg.block_out_channels[0]
    temb = L.timestep_embedding(timesteps, c0, flip_sin_to_cos=True, freq_shift=0).astype(rt.dtype)
    temb = L.TimestepEmbedding(4 * c0, name="time_embedding", **rt.kw)(temb)
    context = context.astype(rt.dtype)
    if cfg.addition_embed_type == "text":
        temb = temb + L.TextTimeEmbedding(4 * c0, cfg.addition_embed_type_num_heads, name="add_embedding",
                                          attention=rt.attention, **rt.kw)(context)
    temb = jnp.repeat(temb, f, axis=0)

    x = L.conv(c0, (3, 3), "conv_in", **rt.kw)(_frames_as_batch(sample.astype(rt.dtype)))
    if extra_input is not None:
        extra = extra_input.astype(rt.dtype)
        x = x + (extra.reshape((b * f,) + extra.shape[2:]) if extra.ndim == 5 else jnp.repeat(extra, f, axis=0))
    x = L.constrain_frames(x)
    x = L.TransformerTemporal(cfg.transformer_in_heads, cfg.attention_head_dim, cfg.norm_num_groups, f,
                              name="transformer_in", remat_policy=rt.policy, attention=rt.attention, **rt.kw)(x)
    skips = [x]
    n = len(cfg.block_out_channels)
    for i, (kind, ch) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
        block = DownBlock3D(cfg, rt, ch, f, kind == CROSS_DOWN, i < n - 1, name=f"down_blocks_{i}")
        x, block_skips = block(x, temb, context)
        skips += list(block_skips)
    x = MidBlock3D(cfg, rt, f, name="mid_block")(x, temb, context)
    return x, skips, temb, context


class UNet3D(nn.Module):
    """diffusers `UNet3DConditionModel` in Flax (see module docstring)."""

    config: UNetConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "auto"  # see Runtime

    @nn.compact
    def __call__(self, sample, timesteps, context, down_block_additional_residuals: Optional[Sequence] = None,
                 mid_block_additional_residual=None, train: bool = False):
        cfg = self.config
        rt = Runtime(self.dtype, self.param_dtype, not train, self.remat, self.remat_policy, self.attention)
        b, f = sample.shape[:2]
        x, skips, temb, context = encoder_forward(cfg, rt, sample, timesteps, context)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"tensors; this U-Net has {len(skips)} skip connections")
            skips = [s + _frames_as_batch(r).astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            x = x + _frames_as_batch(mid_block_additional_residual).astype(x.dtype)

        rev_channels = list(reversed(cfg.block_out_channels))
        n = len(rev_channels)
        per_block = cfg.layers_per_block + 1
        for i, kind in enumerate(cfg.up_block_types):
            block_skips, skips = skips[-per_block:], skips[:-per_block]
            # Upsample to the size of the next block's skips (handles sizes that are not multiples of 2**n).
            up_size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            block = UpBlock3D(cfg, rt, rev_channels[i], f, kind == CROSS_UP, up_size, name=f"up_blocks_{i}")
            x = block(x, temb, context, tuple(block_skips))
            x = L.constrain_frames(x)

        x = nn.silu(L.group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", **rt.kw)(x))
        x = L.conv(cfg.out_channels, (3, 3), "conv_out", **rt.kw)(x)
        return x.reshape((b, f) + x.shape[1:])


def skip_shapes(cfg: UNetConfig, batch: int, frames: int, height: int, width: int) -> list[tuple[int, ...]]:
    """Video-layout shapes of the skip tensors (= the expected `down_block_additional_residuals`)."""
    shapes, h, w = [], height, width
    channels = cfg.skip_channels()
    shapes.append((batch, frames, h, w, channels[0]))
    k = 1
    for i in range(len(cfg.block_out_channels)):
        for _ in range(cfg.layers_per_block):
            shapes.append((batch, frames, h, w, channels[k]))
            k += 1
        if i < len(cfg.block_out_channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((batch, frames, h, w, channels[k]))
            k += 1
    return shapes


__all__ = ["UNetConfig", "UNet3D", "Runtime", "encoder_forward", "skip_shapes", "ax"]
