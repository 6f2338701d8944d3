"""Pretrained weights: diffusers / ModelScope checkpoints -> Flax parameter trees, and tokenizer files.

  module, variables = load_component("text-to-video-ms-1.7b/unet")   # U-Net, VAE or CLIP text model
  tok = load_tokenizer("text-to-video-ms-1.7b/tokenizer")           # transformers.CLIPTokenizer
  python -m dreamvideo_jax.convert --src=text-to-video-ms-1.7b --dst=checkpoints/ms17b_base

Only safetensors are read (lazily, without torch); conversion is strict: every source tensor is used once,
every parameter filled, shapes checked, and errors name each offending key.
"""

from dreamvideo_jax.convert.components import Component, convert_component, load_component, target_shapes
from dreamvideo_jax.convert.configs import (component_kind, read_config, text_config_from_transformers,
                                            unet_config_from_diffusers, vae_config_from_diffusers)
from dreamvideo_jax.convert.keys import modelscope_unet_key
from dreamvideo_jax.convert.snapshot import base_model_config, convert_snapshot
from dreamvideo_jax.convert.torch_to_flax import (ConversionError, convert_lazy, convert_state_dict, flax_path,
                                                  plan_conversion)
from dreamvideo_jax.convert.weights import CheckpointError, Weights, find_weights, open_weights
from dreamvideo_jax.data.tokenizer import clip_tokenizer, load_tokenizer, write_tokenizer_files

__all__ = [
    "load_component", "convert_component", "Component", "target_shapes", "load_tokenizer", "clip_tokenizer",
    "write_tokenizer_files", "convert_snapshot", "base_model_config", "read_config", "component_kind",
    "unet_config_from_diffusers", "vae_config_from_diffusers", "text_config_from_transformers",
    "modelscope_unet_key", "ConversionError", "CheckpointError", "convert_state_dict", "convert_lazy",
    "plan_conversion", "flax_path", "Weights", "open_weights", "find_weights",
]
