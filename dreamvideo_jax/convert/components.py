"""Loading one pretrained component (3D U-Net, KL VAE, CLIP text encoder) into its Flax module.

`load_component(path)` reads a diffusers/transformers component folder (`config.json` + safetensors), builds the
Flax module from that config, converts the weights strictly and returns `(module, variables)`. The U-Net also
loads from a single file in the original ModelScope layout (config: `config=` or the ms-1.7b defaults).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamvideo_jax.convert import keys as K
from dreamvideo_jax.convert.configs import (component_kind, read_config, text_config_from_transformers,
                                            unet_config_from_diffusers, vae_config_from_diffusers)
from dreamvideo_jax.convert.torch_to_flax import convert_lazy, plan_conversion
from dreamvideo_jax.convert.weights import CheckpointError, Weights, open_weights
from dreamvideo_jax.models.text_encoder import CLIPTextEncoder, TextConfig
from dreamvideo_jax.models.unet3d import UNet3D, UNetConfig
from dreamvideo_jax.models.vae import AutoencoderKL, VAEConfig

ComponentConfig = Union[UNetConfig, VAEConfig, TextConfig]


@dataclasses.dataclass
class Component:
    """A converted component: module, variables and where they came from."""

    kind: str  # 'unet' | 'vae' | 'text_encoder'
    config: ComponentConfig
    module: nn.Module
    variables: Optional[dict]  # {'params': ...}; None for a dry run
    source: str  # the weights file or shard index read
    layout: str  # 'diffusers' | 'modelscope' | 'transformers'
    ignored: list[str]  # source keys deliberately not used
    source_dtypes: dict[str, int]  # stored dtype -> number of tensors

    @property
    def num_params(self) -> int:
        shapes = self.variables["params"] if self.variables is not None else target_shapes(self.module)
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def build_module(kind: str, config: ComponentConfig, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    cls = {"unet": UNet3D, "vae": AutoencoderKL, "text_encoder": CLIPTextEncoder}[kind]
    return cls(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype))


def dummy_inputs(module: nn.Module) -> tuple:
    """Smallest inputs that create every parameter (parameter shapes do not depend on input sizes)."""
    c = module.config
    if isinstance(module, UNet3D):
        s = c.downsample_factor
        return (jnp.zeros((1, 1, s, s, c.in_channels)), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, c.cross_attention_dim)))
    if isinstance(module, AutoencoderKL):
        s = c.downsample_factor
        return (jnp.zeros((1, s, s, c.in_channels)),)
    if isinstance(module, CLIPTextEncoder):
        return (jnp.zeros((1, 1), jnp.int32),)
    raise TypeError(f"no dummy inputs for {type(module).__name__}")


def target_shapes(module: nn.Module) -> dict:
    """The module's parameter tree as shapes (`jax.ShapeDtypeStruct`), nothing allocated.

    Parameter shapes depend only on the module class, its config and param_dtype, so they are cached by those.
    """
    key = (type(module), module.config, jnp.dtype(module.param_dtype).name)
    if key not in _SHAPES:
        abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *dummy_inputs(module)))
        if len(_SHAPES) >= 16:
            _SHAPES.pop(next(iter(_SHAPES)))
        _SHAPES[key] = nn.meta.unbox(abstract)["params"]
    return jax.tree.map(lambda x: x, _SHAPES[key])  # a fresh dict per call


_SHAPES: dict = {}


def _as_config(kind: str, config, where: str, output_layer: Optional[int]) -> ComponentConfig:
    want = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": TextConfig}[kind]
    if isinstance(config, want):
        return config
    if isinstance(config, (str, os.PathLike)):
        config = os.fspath(config)
        if os.path.isdir(config):
            where, config = os.path.join(config, "config.json"), read_config(config)
        else:
            if not os.path.isfile(config):
                raise FileNotFoundError(f"{config}: no such config file")
            where = config
            try:
                with open(config) as f:
                    config = json.load(f)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TypeError(f"config must be a {want.__name__}, a config.json path or a dict; got {type(config).__name__}")
    if kind == "unet":
        return unet_config_from_diffusers(config, where)
    if kind == "vae":
        return vae_config_from_diffusers(config, where)
    return text_config_from_transformers(config, where, output_layer)


def _kind_of_config(config) -> Optional[str]:
    for kind, cls in (("unet", UNetConfig), ("vae", VAEConfig), ("text_encoder", TextConfig)):
        if isinstance(config, cls):
            return kind
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None  # reported when the config is read
    if isinstance(config, dict) and (config.get("_class_name") or config.get("model_type") or config.get("architectures")):
        return component_kind(config, "config")
    return None


def _kind_from_keys(names) -> Optional[str]:
    names = list(names)
    if K.is_modelscope_layout(names) or any(".temp_convs." in n for n in names):
        return "unet"
    return None


def _resolve(path: str, kind: Optional[str], config, output_layer: Optional[int]) -> tuple[str, Optional[str], Any]:
    """(weights path, kind, config object or None) for a folder or a single file."""
    if os.path.isdir(path):
        where = os.path.join(path, "config.json")
        if config is None:
            cfg = read_config(path)
            detected = component_kind(cfg, where)
            if kind is not None and kind != detected:
                raise CheckpointError(f"{where}: describes a {detected}, but a {kind} was asked for")
            return path, detected, _as_config(detected, cfg, where, output_layer)
        return path, kind, config
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    beside = os.path.join(os.path.dirname(path), "config.json")
    if config is None and os.path.isfile(beside):
        cfg = read_config(os.path.dirname(path) or ".")
        detected = component_kind(cfg, beside)
        if kind is not None and kind != detected:
            raise CheckpointError(f"{beside}: describes a {detected}, but a {kind} was asked for")
        return path, detected, _as_config(detected, cfg, beside, output_layer)
    return path, kind, config


def convert_component(
    path: str,
    *,
    kind: Optional[str] = None,
    config: Union[ComponentConfig, dict, str, None] = None,
    variant: Optional[str] = None,
    allow_pickle: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    output_layer: Optional[int] = None,
    dry_run: bool = False,
) -> Component:
    """`load_component` with the details (config, source file, layout, ignored keys); `dry_run` checks names
    and shapes only and loads no tensor."""
    path = os.fspath(path)
    if kind is None and config is not None:
        kind = _kind_of_config(config)
    path, kind, config = _resolve(path, kind, config, output_layer)
    weights: Weights = open_weights(path, variant=variant, allow_pickle=allow_pickle)
    try:
        if kind is None:
            kind = _kind_from_keys(weights)
            if kind is None:
                raise CheckpointError(f"{weights.describe}: no config.json beside it and the keys are not a 3D U-Net's; "
                                      f"pass kind= and config=")
        if config is None:
            if kind != "unet":
                raise CheckpointError(f"{weights.describe}: a {kind} needs its config.json (pass config=)")
            config = UNetConfig()  # diffusers' UNet3DConditionModel() defaults = text-to-video-ms-1.7b
        config = _as_config(kind, config, weights.describe, output_layer)
        module = build_module(kind, config, dtype, param_dtype)
        return _convert(kind, config, module, weights, param_dtype, dry_run)
    finally:
        weights.close()


def _convert(kind, config, module, weights: Weights, param_dtype, dry_run: bool) -> Component:
    names = list(weights)
    layout, ignore = ("transformers" if kind == "text_encoder" else "diffusers"), None
    if kind == "unet":
        if K.is_modelscope_layout(names):
            layout = "modelscope"
            mapping = K.rename(names, lambda k: K.modelscope_unet_key(k, config.layers_per_block), weights.describe)
        else:
            mapping = {k: k for k in names}
    elif kind == "vae":
        if K.is_ldm_vae_layout(names):
            raise CheckpointError(f"{weights.describe}: a VAE in the original LDM layout (encoder.down.*); convert it "
                                  f"with diffusers first (AutoencoderKL.from_single_file(...).save_pretrained(DIR))")
        mapping = K.rename(names, K.vae_key, weights.describe)
    else:
        mapping = K.rename(names, K.clip_key, weights.describe)
        ignore = K.clip_ignore(config.layers_run)
    shapes = weights.shapes
    src_shapes = {new: shapes[old] for new, old in mapping.items()}
    # Errors name source keys as stored; a structural renaming also shows the name it was mapped to.
    display = lambda new: mapping[new] if mapping[new].endswith(new) else f"{mapping[new]} (as {new})"
    ignored = sorted(mapping[k] for k in mapping if ignore is not None and ignore(k))
    skipped = set(ignored)
    dtypes: dict[str, int] = {}
    for k in mapping.values():
        if k not in skipped:
            dt = weights.dtypes[k]
            dtypes[dt] = dtypes.get(dt, 0) + 1
    tshapes = target_shapes(module)
    what = f"{weights.describe} ({kind})"
    if dry_run:
        plan_conversion(src_shapes, tshapes, what=what, ignore=ignore, display=display)
        variables = None
    else:
        pdt = jnp.dtype(param_dtype)
        params = convert_lazy(src_shapes, lambda new: weights[mapping[new]], tshapes, what=what, ignore=ignore,
                              display=display, put=lambda a: jnp.asarray(a, dtype=pdt))
        variables = {"params": params}
    return Component(kind, config, module, variables, weights.describe, layout, ignored, dtypes)


def load_component(
    path: str,
    *,
    kind: Optional[str] = None,
    config: Union[ComponentConfig, dict, str, None] = None,
    variant: Optional[str] = None,
    allow_pickle: bool = False,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    output_layer: Optional[int] = None,
) -> tuple[nn.Module, dict]:
    """Reads one pretrained component and returns `(module, variables)`, variables = `{'params': ...}`.

    Args:
      path: a diffusers/transformers component folder (`config.json` + `*.safetensors`, sharded or a precision
        variant) -- the U-Net (`UNet3DConditionModel`), VAE (`AutoencoderKL`) or CLIP text model
        (`CLIPTextModel[WithProjection]`), detected from the config -- or a single weights file. A single file
        with no `config.json` beside it is a U-Net (diffusers or original ModelScope key layout) built from
        `config` (default: the ms-1.7b architecture).
      kind: 'unet' | 'vae' | 'text_encoder' to insist on one (an error if the config says otherwise).
      config: overrides `config.json`: one of our config dataclasses, a diffusers/transformers config dict,
        or a config.json path.
      variant: precision variant to read (e.g. 'fp16') when several are present.
      allow_pickle: read `.bin/.pt/.pth/.ckpt` with `torch.load(weights_only=True)` instead of refusing them.
      dtype, param_dtype: compute dtype of the module and storage dtype of the parameters (float32 default;
        float16/bfloat16 checkpoints are upcast first).
      output_layer: text encoder only -- run this many layers (default: all layers in the checkpoint).

    The modules take channels-last data: the U-Net video latents `(B, F, H, W, C)`, timesteps `(B,)` and text
    states `(B, L, D)`; the VAE images `(N, H, W, C)` (`module.apply(v, x, method='encode')`, `'decode'`);
    the text encoder token ids `(B, L)`.

    Raises:
      FileNotFoundError: missing folder, config or weights.
      CheckpointError: unreadable/truncated/pickled file, unsupported config value.
      ConversionError: weights that do not fit the architecture (lists missing, unexpected and mis-shaped keys).
    """
    c = convert_component(path, kind=kind, config=config, variant=variant, allow_pickle=allow_pickle, dtype=dtype,
                          param_dtype=param_dtype, output_layer=output_layer)
    return c.module, c.variables


__all__ = ["Component", "load_component", "convert_component", "build_module", "target_shapes", "dummy_inputs"]
