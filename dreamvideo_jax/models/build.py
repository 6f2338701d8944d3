"""Modules from a config's `model` section, consistency checks across them, and abstract/real init.

`config.model` holds: dtype, param_dtype, remat, remat_policy, attention, unet (UNetConfig fields), retention
(RetentionConfig fields), text (TextConfig fields), vae_kind ('kl' | 'patch'), vae (VAEConfig fields),
patch (PatchConfig fields).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from dreamvideo_jax.models import attention as attention_lib
from dreamvideo_jax.models.dreamvideo import DreamVideo
from dreamvideo_jax.models.retention import ImageConv, RetentionConfig, init_retention_from_unet, split_keyframes
from dreamvideo_jax.models.text_encoder import CLIPTextEncoder, TextConfig
from dreamvideo_jax.models.unet3d import UNet3D, UNetConfig
from dreamvideo_jax.models.vae import AutoencoderKL, PatchAutoencoder, PatchConfig, VAEConfig

Autoencoder = Union[AutoencoderKL, PatchAutoencoder]
VAE_KINDS = ("kl", "patch")


def dtype_of(name: str):
    """A dtype from its config name ('float32', 'bfloat16'), with an error naming it."""
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ValueError(f"model dtype {name!r} is not a dtype name (use 'float32' or 'bfloat16')") from e


def _from(cls, section) -> Any:
    d = section.to_dict() if isinstance(section, ml_collections.ConfigDict) else dict(section)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; known keys are {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def model_defaults() -> ml_collections.ConfigDict:
    """The `model` config section at full (ModelScope-T2V / DreamVideo) size."""
    return ml_collections.ConfigDict(dict(
        dtype="float32",
        param_dtype="float32",
        frozen_dtype="",
        remat=False,
        remat_policy="nothing_saveable",
        attention="auto",
        unet=dataclasses.asdict(UNetConfig()),
        retention=dataclasses.asdict(RetentionConfig()),
        text=dataclasses.asdict(TextConfig()),
        vae_kind="kl",
        vae=dataclasses.asdict(VAEConfig()),
        patch=dataclasses.asdict(PatchConfig()),
    ))


def unet_config(m) -> UNetConfig:
    return _from(UNetConfig, m.unet)


def retention_config(m) -> RetentionConfig:
    return _from(RetentionConfig, m.retention)


def text_config(m) -> TextConfig:
    return _from(TextConfig, m.text)


def attention(m) -> str:
    """`model.attention`, checked; 'auto' where a config predates the key."""
    return attention_lib.check_implementation(m.get("attention", "auto"))


def _runtime(m) -> dict:
    return dict(dtype=dtype_of(m.dtype), param_dtype=dtype_of(m.param_dtype), attention=attention(m))


def build_unet(m) -> UNet3D:
    return UNet3D(unet_config(m), remat=m.remat, remat_policy=m.remat_policy, **_runtime(m))


def build_dreamvideo(m) -> DreamVideo:
    check_model_config(m)
    return DreamVideo(unet_config(m), retention_config(m), remat=m.remat, remat_policy=m.remat_policy, **_runtime(m))


def build_text_encoder(m) -> CLIPTextEncoder:
    return CLIPTextEncoder(text_config(m), **_runtime(m))


def build_autoencoder(m) -> Autoencoder:
    if m.vae_kind == "kl":
        return AutoencoderKL(_from(VAEConfig, m.vae), **_runtime(m))
    if m.vae_kind == "patch":
        return PatchAutoencoder(_from(PatchConfig, m.patch), dtype=dtype_of(m.dtype), param_dtype=dtype_of(m.param_dtype))
    raise ValueError(f"model.vae_kind={m.vae_kind!r}; use one of {VAE_KINDS}")


def autoencoder_factor(m) -> int:
    return _from(VAEConfig, m.vae).downsample_factor if m.vae_kind == "kl" else int(m.patch.patch_size)


def latent_channels(m) -> int:
    if m.vae_kind == "kl":
        return int(m.vae.latent_channels)
    return int(m.patch.channels) * int(m.patch.patch_size) ** 2


def check_model_config(m) -> None:
    """Cross-component consistency; raises ValueError naming the config keys that disagree."""
    u, r, t = unet_config(m), retention_config(m), text_config(m)
    attention(m)
    if m.vae_kind not in VAE_KINDS:
        raise ValueError(f"model.vae_kind={m.vae_kind!r}; use one of {VAE_KINDS}")
    lc = latent_channels(m)
    if u.in_channels != lc or u.out_channels != lc:
        raise ValueError(f"model.unet.in_channels/out_channels ({u.in_channels}/{u.out_channels}) must equal the "
                         f"autoencoder's latent channels ({lc}, model.vae_kind={m.vae_kind!r})")
    if t.width != u.cross_attention_dim:
        raise ValueError(f"model.text.width ({t.width}) must equal model.unet.cross_attention_dim "
                         f"({u.cross_attention_dim})")
    if r.image_input == "pixels" and r.image_downsample_factor != autoencoder_factor(m):
        raise ValueError(f"model.retention.image_conv_channels {r.image_conv_channels} downsample the image "
                         f"{r.image_downsample_factor}x, but the autoencoder downsamples {autoencoder_factor(m)}x")


def latent_size(m, height: int, width: int) -> tuple[int, int]:
    f = autoencoder_factor(m)
    if height % f or width % f:
        raise ValueError(f"height/width {height}x{width} must be multiples of the autoencoder factor {f}")
    return height // f, width // f


def dummy_inputs(m, batch: int = 1, frames: int = 2, height: int | None = None, width: int | None = None) -> dict:
    """Zero inputs for `DreamVideo.init` (parameter shapes do not depend on frames or spatial size)."""
    f = autoencoder_factor(m)
    height = height or 2 * f * unet_config(m).downsample_factor
    width = width or height
    h, w = latent_size(m, height, width)
    r = retention_config(m)
    image_shape = (batch, height, width, r.image_channels) if r.image_input == "pixels" else (batch, h, w, latent_channels(m))
    if r.last_frame:  # [reference, last frame, given] (retention.stack_keyframes)
        image_shape = image_shape[:-1] + (2 * image_shape[-1] + 1,)
    return dict(
        latents=jnp.zeros((batch, frames, h, w, latent_channels(m)), jnp.float32),
        timesteps=jnp.zeros((batch,), jnp.int32),
        context=jnp.zeros((batch, text_config(m).context_length, unet_config(m).cross_attention_dim), jnp.float32),
        image=jnp.zeros(image_shape, jnp.float32),
    )


def init_last_image_conv(m, key: jax.Array) -> dict:
    """Init of `retention.last_frame`'s 'last_image_conv' alone (the same layers as 'image_conv'; zero output conv),
    unboxed; for weights of a first-frame-only model."""
    r = retention_config(m)
    reference, _, _ = split_keyframes(dummy_inputs(m)["image"])
    module = ImageConv(r, unet_config(m).block_out_channels[0], dtype=dtype_of(m.dtype),
                       param_dtype=dtype_of(m.param_dtype))
    return jax.tree.map(lambda x: x.unbox() if isinstance(x, nn.Partitioned) else x,
                        module.init(key, reference)["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))


def init_dreamvideo(m, key: jax.Array, *, copy_encoder: bool = True) -> dict:
    """Real (jitted) init of the DreamVideo variables; the branch copies the primary when `copy_encoder`."""
    model = build_dreamvideo(m)
    inputs = dummy_inputs(m)

    @jax.jit
    def init(key):
        variables = model.init(key, **inputs)
        if copy_encoder:
            variables = {**variables, "params": init_retention_from_unet(variables["params"])}
        return variables

    return init(key)


def abstract_variables(module, *args, **kwargs) -> Any:
    """Shapes/dtypes (and logical-axis boxes) of `module.init(key, *args)` without allocating anything."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
