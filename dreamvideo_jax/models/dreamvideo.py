"""DreamVideo: primary 3D U-Net + Image Retention branch + reference-image conv block.

`DreamVideo(...)(latents, timesteps, context, image)` -> the U-Net's prediction for `latents`
`(B, F, h, w, C)`. `image` is the reference image `(B, H, W, 3)` in [-1, 1] (or its latent `(B, h, w, C)` when
`retention.image_input == 'latent'`); a dropped image condition is all zeros. Parameter tree:
`{'unet': ..., 'retention': ..., 'image_conv': ...}`, plus `{'reference_skip': {'gate': (C,)}}` with
`retention.reference_skip` (the output gets `gate * image_latent` added on every frame), and `'last_image_conv'`
with `retention.last_frame` (`image` is then `retention.stack_keyframes(reference, last, given)`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dreamvideo_jax.models import layers as L
from dreamvideo_jax.models.retention import ImageConv, ImageRetention, RetentionConfig, split_keyframes
from dreamvideo_jax.models.unet3d import UNet3D, UNetConfig
from dreamvideo_jax.parallel import axes as ax


class ReferenceSkip(nn.Module):
    """`out + gate * image_latent` on every frame; `gate` `(C,)` starts at zero (`RetentionConfig.reference_skip`)."""

    channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, out, image_latent):
        gate = self.param("gate", nn.with_logical_partitioning(L.zeros, (ax.NORM,)), (self.channels,), self.param_dtype)
        return out + (gate.astype(self.dtype) * image_latent.astype(self.dtype))[:, None]


class DreamVideo(nn.Module):
    unet_config: UNetConfig
    retention_config: RetentionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "auto"  # attention implementation of both networks (models/attention.py)

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rm = dict(remat=self.remat, remat_policy=self.remat_policy, attention=self.attention)
        self.unet = UNet3D(self.unet_config, **kw, **rm)
        self.retention = ImageRetention(self.unet_config, self.retention_config.conditioning_scale, **kw, **rm)
        self.image_conv = ImageConv(self.retention_config, self.unet_config.block_out_channels[0], **kw)
        if self.retention_config.reference_skip:
            self.reference_skip = ReferenceSkip(self.unet_config.out_channels, **kw)
        if self.retention_config.last_frame:
            self.last_image_conv = ImageConv(self.retention_config, self.unet_config.block_out_channels[0], **kw)

    def __call__(self, latents, timesteps, context, image, train: bool = False):
        if self.retention_config.last_frame:
            image, last, given = split_keyframes(image)
        features = self.image_conv(image)
        if features.shape[1:3] != latents.shape[2:4]:
            raise ValueError(
                f"reference image of shape {tuple(image.shape)} gives image_conv features of spatial size "
                f"{tuple(features.shape[1:3])}, but the latents are {tuple(latents.shape[2:4])}: the image must be "
                f"{self.retention_config.image_downsample_factor}x the latent size for image_input="
                f"{self.retention_config.image_input!r}")
        if self.retention_config.last_frame:  # the last frame's features go to frame F-1 only, where given
            f = latents.shape[1]
            last_features = self.last_image_conv(last) * given.astype(features.dtype)[:, None, None, None]
            at_last = (jnp.arange(f) == f - 1).astype(features.dtype)[None, :, None, None, None]
            features = features[:, None] + at_last * last_features[:, None]
        down, mid = self.retention(latents, timesteps, context, features, train=train)
        out = self.unet(latents, timesteps, context, down, mid, train=train)
        if self.retention_config.reference_skip:
            out = self.reference_skip(out, image)
        return out

    def unet_only(self, latents, timesteps, context, train: bool = False):
        """The primary U-Net alone (text-to-video base, no retention branch)."""
        return self.unet(latents, timesteps, context, train=train)
