"""diffusers / transformers `config.json` -> this project's config dataclasses.

Each reader starts from the *library's* defaults for keys the file omits (diffusers writes every key, but
hand-made configs may not), maps the architectural keys, ignores the known non-architectural ones, and refuses
values the Flax models do not implement, naming the key. Unknown keys in a diffusers config are refused too
(they would change the architecture silently); transformers configs carry many generic keys, so only the
architectural ones are read there.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from dreamvideo_jax.convert.weights import CheckpointError
from dreamvideo_jax.models.text_encoder import ACTIVATIONS, TextConfig
from dreamvideo_jax.models.unet3d import UNetConfig
from dreamvideo_jax.models.vae import VAEConfig

UNET_CLASS, VAE_CLASS = "UNet3DConditionModel", "AutoencoderKL"
CLIP_TEXT_ARCHS = ("CLIPTextModel", "CLIPTextModelWithProjection")
KINDS = ("unet", "vae", "text_encoder")

# Bookkeeping keys diffusers/our tools write into every config.json.
_BOOKKEEPING = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "_commit_hash"}

# `UNet3DConditionModel.__init__` defaults (diffusers 0.2x-0.42).
UNET_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024, attention_head_dim=64,
    num_attention_heads=None, time_cond_proj_dim=None,
)
# Keys that do not change the architecture or the forward pass.
UNET_IGNORED = {"sample_size"}  # a default resolution hint for pipelines
# Keys whose value must be the one the Flax U-Net implements.
UNET_FIXED = dict(downsample_padding=1, mid_block_scale_factor=1, act_fn="silu", num_attention_heads=None,
                  time_cond_proj_dim=None)

# `AutoencoderKL.__init__` defaults.
VAE_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)
VAE_IGNORED = {"sample_size", "force_upcast"}  # tiling hint; fp16 upcast hint for torch pipelines
VAE_FIXED = dict(act_fn="silu", latents_mean=None, latents_std=None)

# `transformers.CLIPTextConfig` defaults for the architectural keys.
CLIP_DEFAULTS: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


def read_config(folder: str) -> dict:
    """The parsed `config.json` of a component folder (FileNotFoundError / CheckpointError when unusable)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (a diffusers/transformers component folder has a config.json "
                                f"beside its weights)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return cfg


def component_kind(cfg: dict, where: str = "config.json") -> str:
    """'unet', 'vae' or 'text_encoder' from a config's `_class_name` / `architectures` / `model_type`."""
    cls = cfg.get("_class_name")
    if cls == UNET_CLASS:
        return "unet"
    if cls == VAE_CLASS:
        return "vae"
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") == "clip_text_model" or any(a in CLIP_TEXT_ARCHS for a in archs):
        return "text_encoder"
    found = cls or (archs and archs[0]) or cfg.get("model_type") or "nothing"
    raise CheckpointError(f"{where}: unsupported component {found!r}; supported are diffusers {UNET_CLASS}, "
                          f"{VAE_CLASS} and transformers {' / '.join(CLIP_TEXT_ARCHS)}")


def _merge(cfg: dict, defaults: dict, ignored: set, fixed: dict, what: str, where: str) -> dict:
    unknown = sorted(set(cfg) - set(defaults) - _BOOKKEEPING)
    if unknown:
        raise CheckpointError(f"{where}: unknown {what} config key(s) {unknown}; refusing to guess their effect")
    d = {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}
    for k, want in fixed.items():
        got = d[k]
        if got != want and not (isinstance(want, (int, float)) and isinstance(got, (int, float)) and got == want):
            raise CheckpointError(f"{where}: {k}={got!r} is not supported by the Flax {what} (only {want!r})")
    for k in ignored:
        d.pop(k, None)
    for k in fixed:
        d.pop(k, None)
    return d


def unet_config_from_diffusers(cfg: dict, where: str = "unet/config.json") -> UNetConfig:
    """`UNet3DConditionModel` config -> `UNetConfig` (heads = channels / attention_head_dim, as diffusers)."""
    if cfg.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise CheckpointError(f"{where}: _class_name is {cfg['_class_name']!r}, expected {UNET_CLASS!r}")
    d = _merge(cfg, UNET_DEFAULTS, UNET_IGNORED, UNET_FIXED, UNET_CLASS, where)
    if d["norm_num_groups"] is None:
        raise CheckpointError(f"{where}: norm_num_groups=None (no GroupNorm before conv_out) is not supported")
    head = d["attention_head_dim"]
    if isinstance(head, (list, tuple)):
        if len(set(head)) != 1:
            raise CheckpointError(f"{where}: per-block attention_head_dim {list(head)} is not supported (the Flax "
                                  f"U-Net uses one value for every block)")
        head = head[0]
    d["attention_head_dim"] = int(head)
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        d[k] = tuple(d[k])
    try:
        return UNetConfig(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def vae_config_from_diffusers(cfg: dict, where: str = "vae/config.json") -> VAEConfig:
    """`AutoencoderKL` config -> `VAEConfig` (all blocks must be DownEncoderBlock2D / UpDecoderBlock2D)."""
    if cfg.get("_class_name", VAE_CLASS) != VAE_CLASS:
        raise CheckpointError(f"{where}: _class_name is {cfg['_class_name']!r}, expected {VAE_CLASS!r}")
    d = _merge(cfg, VAE_DEFAULTS, VAE_IGNORED, VAE_FIXED, VAE_CLASS, where)
    n = len(d["block_out_channels"])
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d.pop(key))
        if len(types) != n:
            raise CheckpointError(f"{where}: {key} has {len(types)} entries, block_out_channels {n}")
        bad = sorted({t for t in types if t != want})
        if bad:
            raise CheckpointError(f"{where}: {key} {bad} not supported (only {want})")
    d["block_out_channels"] = tuple(d["block_out_channels"])
    if d["shift_factor"] is not None:
        d["shift_factor"] = float(d["shift_factor"])
    d["scaling_factor"] = float(d["scaling_factor"])
    try:
        return VAEConfig(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def text_config_from_transformers(cfg: dict, where: str = "text_encoder/config.json",
                                  output_layer: Optional[int] = None) -> TextConfig:
    """`CLIPTextConfig` -> `TextConfig`.

    `output_layer` defaults to `num_hidden_layers`: a diffusers `text_encoder/` folder is already cut to the
    layers its pipeline uses (ms-1.7b ships 23 of OpenCLIP ViT-H's 24 = ModelScope's "penultimate" output).
    """
    if cfg.get("model_type") == "clip":
        raise CheckpointError(f"{where}: a full CLIPModel (text + vision); save its text model alone "
                              f"(CLIPTextModel) or use the pipeline's text_encoder/ folder")
    d = {**CLIP_DEFAULTS, **{k: v for k, v in cfg.items() if k in CLIP_DEFAULTS}}
    width, inter = int(d["hidden_size"]), int(d["intermediate_size"])
    if inter % width:
        raise CheckpointError(f"{where}: intermediate_size {inter} is not a multiple of hidden_size {width} "
                              f"(the Flax text encoder uses an integer mlp_ratio)")
    if d["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(f"{where}: hidden_act={d['hidden_act']!r} not supported (use one of "
                              f"{sorted(ACTIVATIONS)})")
    layers = int(d["num_hidden_layers"])
    try:
        return TextConfig(vocab_size=int(d["vocab_size"]), width=width, num_layers=layers,
                          num_heads=int(d["num_attention_heads"]), context_length=int(d["max_position_embeddings"]),
                          mlp_ratio=inter // width, output_layer=layers if output_layer is None else int(output_layer),
                          act=d["hidden_act"], eps=float(d["layer_norm_eps"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


__all__ = ["read_config", "component_kind", "unet_config_from_diffusers", "vae_config_from_diffusers",
           "text_config_from_transformers", "KINDS", "UNET_DEFAULTS", "VAE_DEFAULTS"]
