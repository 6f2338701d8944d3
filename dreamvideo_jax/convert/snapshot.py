"""A whole text-to-video snapshot -> the project's base checkpoint.

`convert_snapshot(src, dst)` reads a diffusers snapshot (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, e.g.
`text-to-video-ms-1.7b`), converts the three networks and writes to `dst`:
  * the base checkpoint (`checkpoints.save_base`): an orbax checkpoint of
    `{'unet', 'text_encoder', 'vae'}` parameters plus `model_config.json`, the `model` config section describing
    exactly these architectures -- what training's `config.init_from` loads (training then initialises the
    image-retention branch by copying the converted U-Net, `models.retention.init_retention_from_unet`);
  * `tokenizer/`: the snapshot's tokenizer folder, or the CLIP tokenizer built offline from open_clip's BPE file;
  * `conversion.json`: what was read from where (files, key layout, stored dtypes, ignored keys, parameter
    counts).
Each component can come from elsewhere (`unet=`, `vae=`, ... override the snapshot's folders; `unet=` may be a
single ModelScope-layout `.safetensors` file). Output is written to a temporary folder beside `dst` and moved
into place at the end, so a failed conversion leaves nothing half-written; a `dst` that is, contains or lies inside
an input (the snapshot or a component) is refused before anything is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from typing import Any, Optional

import ml_collections

from dreamvideo_jax.convert.components import Component, convert_component
from dreamvideo_jax.convert.weights import CheckpointError
from dreamvideo_jax.errors import InputError
from dreamvideo_jax.models.build import check_model_config, model_defaults
from dreamvideo_jax.models.text_encoder import TextConfig
from dreamvideo_jax.models.unet3d import UNetConfig
from dreamvideo_jax.models.vae import VAEConfig

COMPONENTS = ("unet", "vae", "text_encoder")
PARAM_DTYPES = ("float32", "bfloat16", "float16")


def base_model_config(unet: UNetConfig, text: TextConfig, vae: VAEConfig, *, dtype: str = "float32",
                      param_dtype: str = "float32") -> ml_collections.ConfigDict:
    """The `model` config section for converted components (defaults for everything else).

    The retention branch's pixel `image_conv` is resized to the VAE's downsampling factor when it differs from
    the default x8 (each extra level repeats the last width).
    """
    m = model_defaults()
    m.dtype, m.param_dtype = dtype, param_dtype
    m.unet = dataclasses.asdict(unet)
    m.text = dataclasses.asdict(text)
    m.vae_kind = "kl"
    m.vae = dataclasses.asdict(vae)
    if m.retention.image_input == "pixels":
        levels = int(math.log2(vae.downsample_factor)) + 1
        ch = tuple(m.retention.image_conv_channels)
        if len(ch) != levels:
            m.retention.image_conv_channels = ch[:levels] if levels <= len(ch) else ch + (ch[-1],) * (levels - len(ch))
    try:
        check_model_config(m)
    except ValueError as e:
        raise CheckpointError(f"the components do not fit together: {e}") from None
    return m


def _tokenizer(src: Optional[str], out: str) -> str:
    """Copies a tokenizer folder to `out` (checking it loads) or builds CLIP's; returns a description."""
    from dreamvideo_jax.data.tokenizer import load_tokenizer, write_tokenizer_files

    if src is not None:
        load_tokenizer(src)  # raises FileNotFoundError naming what is missing
        shutil.copytree(src, out)
        where = os.path.abspath(src)
    else:
        write_tokenizer_files(out)
        where = "CLIP BPE vocabulary of the installed open-clip-torch package"
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o777 & ~umask)  # the folder may come from a private temporary directory
    return where


def _refuse_overlap(dst: str, inputs: list[tuple[str, str]]) -> None:
    """Raises InputError when `dst` is an input path, lies inside one, or contains one (symlinks resolved):
    writing there, or replacing it with --overwrite, would change or delete the inputs."""
    out = os.path.realpath(dst)
    for label, path in inputs:
        real = os.path.realpath(path)
        if out == real:
            how = "is the same folder as"
        elif os.path.commonpath([out, real]) == real:
            how = "lies inside"
        elif os.path.commonpath([out, real]) == out:
            how = "contains"
        else:
            continue
        raise InputError("dst", dst, f"{how} the input {label}; writing the output there would change or delete "
                         "the inputs: choose an output folder outside them")


def _describe(c: Component) -> dict:
    return dict(kind=c.kind, source=c.source, layout=c.layout, source_dtypes=c.source_dtypes,
                ignored_keys=c.ignored, num_params=c.num_params, config=dataclasses.asdict(c.config))


def convert_snapshot(
    src: Optional[str],
    dst: str,
    *,
    unet: Optional[str] = None,
    vae: Optional[str] = None,
    text_encoder: Optional[str] = None,
    tokenizer: Optional[str] = None,
    unet_config: Optional[str] = None,
    variant: Optional[str] = None,
    allow_pickle: bool = False,
    param_dtype: str = "float32",
    text_output_layer: Optional[int] = None,
    overwrite: bool = False,
    dry_run: bool = False,
) -> dict:
    """Converts a snapshot into a base checkpoint at `dst` (see module docstring); returns the summary dict.

    Args:
      src: snapshot folder with `unet/ vae/ text_encoder/ [tokenizer/]`; may be None when all three networks
        are given explicitly.
      unet, vae, text_encoder, tokenizer: component paths overriding the snapshot's.
      unet_config: config.json for a single-file U-Net without one beside it (default: ms-1.7b architecture).
      variant: precision variant to read, e.g. 'fp16' (default: full precision, or the only variant present).
      allow_pickle: read pickle checkpoints with `torch.load(weights_only=True)` instead of refusing them.
      param_dtype: storage dtype of the written parameters ('float32' default; the checkpoint's own dtype is
        only an input format).
      text_output_layer: run this many text-encoder layers (default: all in the checkpoint).
      overwrite: replace a non-empty `dst`.
      dry_run: check every name and shape but load no tensor and write nothing.
    """
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"param_dtype={param_dtype!r}; use one of {PARAM_DTYPES}")
    if src is not None and not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such snapshot folder")
    given = dict(src=src, unet=unet, unet_config=unet_config, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    paths = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for name in COMPONENTS:
        if paths[name] is None:
            if src is None:
                raise ValueError(f"no source for the {name}: give the snapshot folder (--src) or --{name}")
            paths[name] = os.path.join(src, name)
    if tokenizer is None and src is not None and os.path.isdir(os.path.join(src, "tokenizer")):
        tokenizer = os.path.join(src, "tokenizer")
    dst = os.path.abspath(dst)
    derived = {k: v for k, v in dict(paths, tokenizer=tokenizer).items() if given[k] is None and v is not None}
    _refuse_overlap(dst, [(f"--{k}={v}", v) for k, v in given.items() if v is not None]
                    + [(f"{k} folder {v} of --src", v) for k, v in derived.items()])
    if not dry_run and os.path.exists(dst):
        if not os.path.isdir(dst):
            raise FileExistsError(f"{dst}: exists and is not a folder")
        if os.listdir(dst) and not overwrite:
            raise FileExistsError(f"{dst}: not empty; pass overwrite=True (--overwrite) to replace it")

    comps: dict[str, Component] = {}
    for name in COMPONENTS:
        comps[name] = convert_component(
            paths[name], kind=name, config=unet_config if name == "unet" else None, variant=variant,
            allow_pickle=allow_pickle, param_dtype=param_dtype,
            output_layer=text_output_layer if name == "text_encoder" else None, dry_run=dry_run)
    model_config = base_model_config(comps["unet"].config, comps["text_encoder"].config, comps["vae"].config,
                                     param_dtype=param_dtype)
    summary: dict[str, Any] = dict(dst=dst, param_dtype=param_dtype, dry_run=dry_run,
                                   components={n: _describe(c) for n, c in comps.items()})
    if dry_run:
        summary["tokenizer"] = os.path.abspath(tokenizer) if tokenizer else "built from open-clip-torch"
        return summary

    from dreamvideo_jax.checkpoints import save_base

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    holder = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial.", dir=parent)
    out = os.path.join(holder, "out")
    try:
        params = {n: comps[n].variables["params"] for n in COMPONENTS}
        save_base(out, params, model_config)
        summary["tokenizer"] = _tokenizer(tokenizer, os.path.join(out, "tokenizer"))
        with open(os.path.join(out, "conversion.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(out, dst)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    return summary


__all__ = ["convert_snapshot", "base_model_config", "COMPONENTS"]
