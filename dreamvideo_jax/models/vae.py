"""Frame autoencoders: the Stable Diffusion KL-f8 VAE and a lossless space-to-depth "autoencoder".

Both take channels-last images `(N, H, W, C)` in [-1, 1] and share one interface:
  * `encode(x) -> (mean, logvar)` unscaled latent moments (`logvar` is None for the lossless one);
  * `latents(x, key=None)` -> scaled latents, `(sample - shift) * scaling_factor` (the mean when `key` is None);
  * `decode(z)` -> images from scaled latents.
`encode_video` / `decode_video` apply them to `(B, F, H, W, C)` videos (frames as a batch; decoding in chunks,
since the VAE decode is the memory peak of sampling).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamvideo_jax.models import layers as L


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers `AutoencoderKL` config fields (defaults = SD KL-f8 as used by ModelScope-T2V)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)



class _MidBlock(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # attention implementation (models/attention.py; config key model.attention)

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = x.shape[-1]
        x = L.ResnetBlock(ch, c.norm_num_groups, 1e-6, name="resnets_0", **kw)(x)
        if c.mid_block_add_attention:
            x = L.Attention(1, ch, qkv_bias=True, norm_groups=c.norm_num_groups, norm_eps=1e-6,
                            name="attentions_0", attention=self.attention, **kw)(x)
        return L.ResnetBlock(ch, c.norm_num_groups, 1e-6, name="resnets_1", **kw)(x)


class _DownEncoderBlock(nn.Module):
    config: VAEConfig
    out_channels: int
    add_downsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(c.layers_per_block):
            x = L.ResnetBlock(self.out_channels, c.norm_num_groups, 1e-6, name=f"resnets_{i}", **kw)(x)
        if self.add_downsample:
            x = L.Downsample(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        return x


class _UpDecoderBlock(nn.Module):
    config: VAEConfig
    out_channels: int
    add_upsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(c.layers_per_block + 1):
            x = L.ResnetBlock(self.out_channels, c.norm_num_groups, 1e-6, name=f"resnets_{i}", **kw)(x)
        if self.add_upsample:
            x = L.Upsample(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # see _MidBlock

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = c.block_out_channels
        x = L.conv(ch[0], (3, 3), "conv_in", **kw)(x)
        for i, out in enumerate(ch):
            x = _DownEncoderBlock(c, out, i < len(ch) - 1, name=f"down_blocks_{i}", **kw)(x)
        x = _MidBlock(c, name="mid_block", attention=self.attention, **kw)(x)
        x = nn.silu(L.group_norm(c.norm_num_groups, 1e-6, "conv_norm_out", **kw)(x))
        return L.conv(2 * c.latent_channels, (3, 3), "conv_out", **kw)(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # see _MidBlock

    @nn.compact
    def __call__(self, z):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = tuple(reversed(c.block_out_channels))
        x = L.conv(ch[0], (3, 3), "conv_in", **kw)(z)
        x = _MidBlock(c, name="mid_block", attention=self.attention, **kw)(x)
        for i, out in enumerate(ch):
            x = _UpDecoderBlock(c, out, i < len(ch) - 1, name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(L.group_norm(c.norm_num_groups, 1e-6, "conv_norm_out", **kw)(x))
        return L.conv(c.out_channels, (3, 3), "conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """SD KL-f8 VAE with diffusers' names (`encoder`, `decoder`, `quant_conv`, `post_quant_conv`)."""

    config: VAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # see _MidBlock

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(c, attention=self.attention, **kw)
        self.decoder = Decoder(c, attention=self.attention, **kw)
        if c.use_quant_conv:
            self.quant_conv = L.conv(2 * c.latent_channels, (1, 1), None, **kw)
        if c.use_post_quant_conv:
            self.post_quant_conv = L.conv(c.latent_channels, (1, 1), None, **kw)

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def __call__(self, x, key=None):
        """Encode and decode (used for init)."""
        return self.decode(self.latents(x, key))

    def encode(self, x):
        moments = self.encoder(x.astype(self.dtype))
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def latents(self, x, key=None):
        mean, logvar = self.encode(x)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def decode(self, z):
        z = z.astype(self.dtype) / self.config.scaling_factor + (self.config.shift_factor or 0.0)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    patch_size: int = 4
    channels: int = 3
    scaling_factor: float = 1.0


class PatchAutoencoder(nn.Module):
    """Lossless, parameter-free space-to-depth: `(N, H, W, C) <-> (N, H/p, W/p, C*p*p)`.

    Makes pixel-space diffusion on tiny CPU runs affordable (the U-Net works at 1/p resolution)."""

    config: PatchConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.config.patch_size

    @property
    def latent_channels(self) -> int:
        return self.config.channels * self.config.patch_size ** 2

    def __call__(self, x, key=None):
        return self.decode(self.latents(x, key))

    def encode(self, x):
        n, h, w, c = x.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"PatchAutoencoder: image size {h}x{w} is not a multiple of patch_size {p}")
        x = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h // p, w // p, p * p * c).astype(self.dtype), None

    def latents(self, x, key=None):
        del key  # deterministic
        return self.encode(x)[0] * self.config.scaling_factor

    def decode(self, z):
        n, h, w, d = z.shape
        p, c = self.config.patch_size, self.config.channels
        z = (z / self.config.scaling_factor).reshape(n, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return z.reshape(n, h * p, w * p, c)


def encode_video(vae: nn.Module, variables, video, key=None):
    """`(B, F, H, W, C)` frames -> scaled latents `(B, F, h, w, c)` (frames encoded as one batch)."""
    b, f = video.shape[:2]
    z = vae.apply(variables, video.reshape((b * f,) + video.shape[2:]), key, method="latents")
    return z.reshape((b, f) + z.shape[1:])


def decode_video(vae: nn.Module, variables, latents, chunk_size: Optional[int] = None):
    """Scaled latents `(B, F, h, w, c)` -> frames `(B, F, H, W, C)`, decoding `chunk_size` frames at a time."""
    b, f = latents.shape[:2]
    z = latents.reshape((b * f,) + latents.shape[2:])
    n = z.shape[0]
    decode = lambda chunk: vae.apply(variables, chunk, method="decode")
    if chunk_size is None or chunk_size >= n:
        x = decode(z)
    else:
        pad = (-n) % chunk_size
        zp = jnp.pad(z, ((0, pad),) + ((0, 0),) * (z.ndim - 1))
        x = jax.lax.map(decode, zp.reshape((-1, chunk_size) + z.shape[1:]))
        x = x.reshape((-1,) + x.shape[2:])[:n]
    return x.reshape((b, f) + x.shape[1:])
