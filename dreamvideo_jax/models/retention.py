"""Image Retention branch and the reference-image conv block (`image_conv`).

The branch is a trainable copy of the U-Net's input half (conv_in, time embedding(s), transformer_in, down blocks,
mid block; ControlNet pattern). Its input is `conv_in(noisy latents) + image_conv(reference image)`, broadcast
over frames; it sees the same timesteps and text. Each of its skip tensors and its mid output goes through a
zero-initialised 1x1 conv (`controlnet_down_blocks_i`, `controlnet_mid_block`); the results are added to the
primary U-Net's skips and mid output. At initialisation the composed model therefore equals the primary U-Net.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamvideo_jax.models import layers as L
from dreamvideo_jax.models.unet3d import Runtime, UNetConfig, encoder_forward

IMAGE_INPUTS = ("pixels", "latent")

# Parameter groups of the primary U-Net that the branch copies (`init_retention_from_unet`).
COPIED_FROM_UNET = ("conv_in", "time_embedding", "add_embedding", "transformer_in", "down_blocks_", "mid_block")


@dataclasses.dataclass(frozen=True)
class RetentionConfig:
    """image_input: 'pixels' = reference image in [-1, 1] at full resolution, downsampled by `image_conv` to
    latent resolution (ControlNet conditioning-embedding style); 'latent' = its VAE latent (one conv).
    `image_conv_channels` has len = log2(latent downsample factor) + 1 for 'pixels'.

    reference_skip (off by default, not in the paper): adds `g * image_latent` to the model's output for every
    frame, `g` a learnt per-channel gate `(C,)` that starts at zero (so a new DreamVideo still equals its primary
    U-Net). With an x0 target the network then only has to predict what changes against the reference image,
    which a narrow U-Net cannot pass through its first conv losslessly. Needs image_input='latent' and
    train.prediction_type='x0'; a dropped image condition (zeros) adds nothing."""

    image_input: str = "pixels"
    image_conv_channels: tuple[int, ...] = (16, 32, 96, 256)
    image_channels: int = 3
    conditioning_scale: float = 1.0
    reference_skip: bool = False
    last_frame: bool = False

    def __post_init__(self):
        object.__setattr__(self, "image_conv_channels", tuple(self.image_conv_channels))
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"RetentionConfig.image_input={self.image_input!r}; use one of {IMAGE_INPUTS}")
        if self.reference_skip and self.image_input != "latent":
            raise ValueError("RetentionConfig.reference_skip=True adds the reference image's latent to the output: it "
                             f"needs image_input='latent', got {self.image_input!r}")
        if self.image_input == "pixels" and not self.image_conv_channels:
            raise ValueError("RetentionConfig.image_conv_channels must not be empty for image_input='pixels'")

    @property
    def image_downsample_factor(self) -> int:
        return 2 ** (len(self.image_conv_channels) - 1) if self.image_input == "pixels" else 1


def stack_keyframes(reference, last=None, given=None):
    """The model's image input with `RetentionConfig.last_frame`: `[reference, last, given]` on the channel axis.

    reference, last: `(B, H, W, C)` (pixels in [-1, 1], or latents); `last=None` = no sample has one.
    given: `(B,)` bool/float, whether sample b's last frame is given (default: all, when `last` is given); the
    last-frame channels of a sample without one are zeroed here, so nothing leaks from them.
    """
    b = reference.shape[0]
    if last is None:
        last, given = jnp.zeros_like(reference), jnp.zeros((b,), reference.dtype)
    elif given is None:
        given = jnp.ones((b,), reference.dtype)
    given = jnp.asarray(given).astype(reference.dtype).reshape((b, 1, 1, 1))
    plane = jnp.broadcast_to(given, reference.shape[:-1] + (1,))
    return jnp.concatenate([reference, last.astype(reference.dtype) * given, plane], axis=-1)


def split_keyframes(image):
    """The inverse of `stack_keyframes`: `(reference, last, given (B,))`."""
    c = (image.shape[-1] - 1) // 2
    if image.shape[-1] != 2 * c + 1:
        raise ValueError(f"a first+last-frame image input has 2 C + 1 channels; got shape {tuple(image.shape)}")
    return image[..., :c], image[..., c:2 * c], image[:, 0, 0, 2 * c]


class ImageConv(nn.Module):
    """Reference-image encoder; its last conv (`conv_out`) is zero-initialised.

    'pixels': conv_in 3x3 -> [conv 3x3, conv 3x3 stride 2] per extra level -> conv_out 3x3, SiLU between
    (diffusers `ControlNetConditioningEmbedding`, names `conv_in`, `blocks_i`, `conv_out`).
    'latent': a single zero-initialised 3x3 conv `conv_out`.
    Input `(B, H, W, C)`, output `(B, H/f, W/f, out_channels)`.
    """

    config: RetentionConfig
    out_channels: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, image):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = image.astype(self.dtype)
        if self.config.image_input == "pixels":
            ch = self.config.image_conv_channels
            x = nn.silu(L.conv(ch[0], (3, 3), "conv_in", **kw)(x))
            for i in range(len(ch) - 1):
                x = nn.silu(L.conv(ch[i], (3, 3), f"blocks_{2 * i}", **kw)(x))
                x = nn.silu(L.conv(ch[i + 1], (3, 3), f"blocks_{2 * i + 1}", strides=(2, 2),
                                   padding=((1, 1), (1, 1)), **kw)(x))
        return L.conv(self.out_channels, (3, 3), "conv_out", zero_init=True, **kw)(x)


class ImageRetention(nn.Module):
    """The retention branch: returns (down residuals, mid residual) in video layout `(B, F, h, w, c)`.

    `image_features` are `(B, h, w, c)` (the same on every frame) or `(B, F, h, w, c)` (per frame)."""

    config: UNetConfig
    conditioning_scale: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    attention: str = "auto"  # see unet3d.Runtime

    @nn.compact
    def __call__(self, sample, timesteps, context, image_features, train: bool = False):
        rt = Runtime(self.dtype, self.param_dtype, not train, self.remat, self.remat_policy, self.attention)
        b, f = sample.shape[:2]
        x, skips, _, _ = encoder_forward(self.config, rt, sample, timesteps, context, extra_input=image_features)
        zero_conv = lambda c, name: L.conv(c, (1, 1), name, zero_init=True, **rt.kw)
        video = lambda y: y.reshape((b, f) + y.shape[1:]) * self.conditioning_scale
        down = tuple(video(zero_conv(s.shape[-1], f"controlnet_down_blocks_{i}")(s)) for i, s in enumerate(skips))
        mid = video(zero_conv(x.shape[-1], "controlnet_mid_block")(x))
        return down, mid


def init_retention_from_unet(params: dict) -> dict:
    """Returns `params` with the branch's conv_in, time embedding (and `add_embedding`, if any), transformer_in,
    down blocks and mid block replaced by copies of the primary U-Net's (`params['unet']`); zero convs and image_conv are kept."""
    unet, branch = params["unet"], dict(params["retention"])
    copied = [k for k in unet if k.startswith(COPIED_FROM_UNET)]
    for k in copied:
        if k not in branch:
            raise KeyError(f"retention branch has no parameter group {k!r} to copy from the U-Net")
        src_shapes = jax.tree.map(jnp.shape, unet[k])
        dst_shapes = jax.tree.map(jnp.shape, branch[k])
        if src_shapes != dst_shapes:
            raise ValueError(f"parameter group {k!r}: U-Net and retention branch shapes differ")
        branch[k] = jax.tree.map(jnp.array, unet[k])  # a copy: the two must not share buffers (donation)
    return {**params, "retention": branch}
