"""Source key layouts -> diffusers/transformers names, applied before the generic torch -> flax rule.

* U-Net, original ModelScope-T2V layout (`model.diffusion_model.input_blocks...`): the renaming
  of diffusers' `scripts/convert_ms_text_to_video_to_diffusers.py`, generalised to any `layers_per_block`:
  `time_embed.0/2` -> `time_embedding.linear_1/2`, `input_blocks.0.0/1` -> `conv_in` / `transformer_in`,
  `input_blocks.i` (i >= 1; block b, layer l = divmod(i-1, layers_per_block+1)): `.0` ResBlock -> `resnets.l`
  (`in_layers.0/2` -> `norm1/conv1`, `emb_layers.1` -> `time_emb_proj`, `out_layers.0/3` -> `norm2/conv2`,
  `skip_connection` -> `conv_shortcut`), `.0.temopral_conv` (sic) -> `temp_convs.l`, `.1` -> `attentions.l`,
  `.2` -> `temp_attentions.l`, `.op` -> `downsamplers.0.conv`; `middle_block.0/1/2/3` -> `resnets.0`,
  `attentions.0`, `temp_attentions.0`, `resnets.1`; `output_blocks.i` (b, l = divmod(i, layers_per_block+1))
  likewise with `.k.conv` -> `upsamplers.0.conv`; `out.0/2` -> `conv_norm_out` / `conv_out`. The temporal
  transformers' Conv1d `proj_in/proj_out` (O, I, 1) are squeezed by the generic rule.
* VAE: pre-0.14 diffusers attention names (`query/key/value/proj_attn`) -> `to_q/to_k/to_v/to_out.0`.
* CLIP text model: optional `text_model.` prefix removed; `position_ids` buffers, `text_projection` and layers
  at or after `output_layer` are ignored.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

from dreamvideo_jax.convert.weights import CheckpointError

MODELSCOPE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_TEMPORAL_CONV = "temopral_conv."  # the original code's spelling


def strip_modelscope_prefix(key: str) -> str:
    for p in MODELSCOPE_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def is_modelscope_layout(keys: Iterable[str]) -> bool:
    return any(strip_modelscope_prefix(k).startswith(("input_blocks.", "middle_block.", "output_blocks."))
               for k in keys)


def _resnet(rest: str, resnet: str, temp_conv: str) -> Optional[str]:
    if rest.startswith(_TEMPORAL_CONV):
        return temp_conv + rest[len(_TEMPORAL_CONV):]
    for old, new in _RESNET:
        if rest.startswith(old):
            return resnet + new + rest[len(old):]
    return None


def _layer(sub: str, rest: str, prefix: str, layer: int) -> Optional[str]:
    """One ModelScope layer (`.0` ResBlock, `.1` SpatialTransformer, `.2` TemporalTransformer)."""
    if sub == "0":
        return _resnet(rest, f"{prefix}.resnets.{layer}.", f"{prefix}.temp_convs.{layer}.")
    if sub == "1":
        return f"{prefix}.attentions.{layer}.{rest}"
    if sub == "2":
        return f"{prefix}.temp_attentions.{layer}.{rest}"
    return None


def modelscope_unet_key(key: str, layers_per_block: int) -> Optional[str]:
    """The diffusers name of an original ModelScope U-Net key, or None when the key has no counterpart."""
    key = strip_modelscope_prefix(key)
    parts = key.split(".")
    per_level = layers_per_block + 1
    head, rest2 = parts[0], ".".join(parts[2:])
    if len(parts) < 3:
        return None
    if head == "time_embed" and parts[1] in ("0", "2"):
        return f"time_embedding.linear_{1 if parts[1] == '0' else 2}.{rest2}"
    if head == "out" and parts[1] in ("0", "2"):
        return f"{'conv_norm_out' if parts[1] == '0' else 'conv_out'}.{rest2}"
    if not parts[1].isdigit():
        return None
    i = int(parts[1])
    if head == "input_blocks":
        if i == 0:
            name = {"0": "conv_in", "1": "transformer_in"}.get(parts[2])
            return f"{name}.{'.'.join(parts[3:])}" if name and len(parts) > 3 else None
        block, layer = divmod(i - 1, per_level)
        if parts[2] == "op":
            tail = ".".join(parts[3:])
            return f"down_blocks.{block}.downsamplers.0.conv.{tail}" if layer == layers_per_block and tail else None
        if len(parts) < 4 or layer >= layers_per_block:
            return None
        return _layer(parts[2], ".".join(parts[3:]), f"down_blocks.{block}", layer)
    if head == "middle_block":
        rest = ".".join(parts[2:])
        if i in (0, 3):
            n = 0 if i == 0 else 1
            return _resnet(rest, f"mid_block.resnets.{n}.", f"mid_block.temp_convs.{n}.")
        if i == 1:
            return f"mid_block.attentions.0.{rest}"
        if i == 2:
            return f"mid_block.temp_attentions.0.{rest}"
        return None
    if head == "output_blocks":
        block, layer = divmod(i, per_level)
        if len(parts) < 4:
            return None
        if parts[2] != "0" and parts[3] == "conv" and len(parts) == 5:
            return f"up_blocks.{block}.upsamplers.0.conv.{parts[4]}"
        return _layer(parts[2], ".".join(parts[3:]), f"up_blocks.{block}", layer)
    return None


_OLD_VAE_ATTN = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_OLD_VAE_NAMES = {"query": "to_q.", "key": "to_k.", "value": "to_v.", "proj_attn": "to_out.0."}


def vae_key(key: str) -> str:
    return _OLD_VAE_ATTN.sub(lambda m: m.group(1) + _OLD_VAE_NAMES[m.group(2)], key)


def is_ldm_vae_layout(keys: Iterable[str]) -> bool:
    return any(k.startswith(("encoder.down.", "decoder.up.", "first_stage_model.")) for k in keys)


def clip_key(key: str) -> str:
    return key[len("text_model."):] if key.startswith("text_model.") else key


def clip_ignore(output_layer: int) -> Callable[[str], bool]:
    """Source keys (after `clip_key`) the text encoder deliberately does not use."""
    layer = re.compile(r"encoder\.layers\.(\d+)\.")

    def ignore(key: str) -> bool:
        if key.endswith("position_ids") or key.startswith("text_projection."):
            return True
        m = layer.match(key)
        return bool(m) and int(m.group(1)) >= output_layer

    return ignore


def rename(keys: Iterable[str], fn: Callable[[str], Optional[str]], what: str) -> dict[str, str]:
    """{new name: source name}; keys `fn` maps to None keep their name (they will be reported as unexpected).

    Raises `CheckpointError` when two source keys map to one name.
    """
    out: dict[str, str] = {}
    for k in keys:
        new = fn(k) or k
        if new in out:
            raise CheckpointError(f"{what}: source keys {out[new]!r} and {k!r} both map to {new!r}")
        out[new] = k
    return out


__all__ = ["modelscope_unet_key", "is_modelscope_layout", "strip_modelscope_prefix", "vae_key", "clip_key",
           "clip_ignore", "is_ldm_vae_layout", "rename"]
