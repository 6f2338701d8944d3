"""Loading weights for sampling: training workdirs, single checkpoints, converted base checkpoints, random init.

All loaders return a :class:`Loaded` whose ``variables`` use the layout of
``training.checkpoint.load_for_inference``:

* DreamVideo (``train.mode='dreamvideo'``): ``{'dreamvideo': {'unet', 'retention', 'image_conv'}, 'text_encoder',
  'vae'}``;
* text-to-video base (``'t2v'``, also every converted ModelScope snapshot): ``{'unet', 'text_encoder', 'vae'}``.

:func:`split_variables` also accepts the trainer's ``{'model': ..., 'text_encoder', 'vae'}`` and flax
``{'params': ...}`` wrappers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dreamvideo_jax.models import build as mb
from dreamvideo_jax.sampling.inputs import InputError

log = logging.getLogger(__name__)

MODES = ("dreamvideo", "t2v")
DREAMVIDEO_KEYS = ("unet", "retention", "image_conv")


@dataclasses.dataclass
class Loaded:
    """Weights plus where they came from."""

    config: ml_collections.ConfigDict
    variables: dict
    source: str  # human-readable description, e.g. "workdir /runs/a, step 2000, EMA"
    step: int | None = None
    tokenizer_dir: str | None = None  # a tokenizer folder shipped with the weights, if any


def _unwrap(tree: Any) -> Any:
    if isinstance(tree, dict) and set(tree) == {"params"}:
        return tree["params"]
    return tree


def split_variables(variables: dict, mode: str | None = None) -> tuple[str, dict, dict, dict]:
    """``(mode, model_params, text_params, vae_params)`` from any supported layout.

    ``model_params`` is what ``DreamVideo.apply({'params': ...})`` takes: ``{'unet', 'retention', 'image_conv'}``
    for DreamVideo, ``{'unet'}`` for the primary U-Net alone. ``mode=None`` infers it from the tree; asking for
    ``'t2v'`` with DreamVideo weights runs their primary U-Net alone (the base the branch was trained on).

    Raises:
        ValueError: an unknown layout, or ``'dreamvideo'`` asked of weights without an image branch.
    """
    v = dict(variables)
    if "dreamvideo" in v:
        model = dict(_unwrap(v["dreamvideo"]))
    elif "model" in v:
        model = dict(_unwrap(v["model"]))
    elif "unet" in v:
        model = {"unet": _unwrap(v["unet"])}
        for k in ("retention", "image_conv"):
            if k in v:
                model[k] = _unwrap(v[k])
    else:
        raise ValueError(f"variables hold {sorted(v)}; expected 'dreamvideo' or 'unet' (plus 'text_encoder', 'vae')")
    if "text_encoder" not in v:
        raise ValueError(f"variables hold {sorted(v)}; 'text_encoder' is missing")
    has_branch = all(k in model for k in DREAMVIDEO_KEYS)
    if mode is None:
        mode = "dreamvideo" if has_branch else "t2v"
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    if mode == "dreamvideo" and not has_branch:
        raise ValueError("these weights are a text-to-video model (no image-retention branch); use mode 't2v'")
    if mode == "t2v":
        model = {"unet": model["unet"]}
    return mode, model, _unwrap(v["text_encoder"]) or {}, _unwrap(v.get("vae", {})) or {}


# ------------------------------------------------------------------------------------------------------------
# Random weights (smoke tests, benchmarks)


def _abstract(config, mode: str) -> dict:
    from dreamvideo_jax.parallel.sharding import unbox

    m = config.model
    model = mb.build_dreamvideo(m)
    inputs = mb.dummy_inputs(m)
    def init():
        if mode == "t2v":
            return model.init(jax.random.key(0), inputs["latents"], inputs["timesteps"], inputs["context"],
                              method="unet_only")
        return model.init(jax.random.key(0), **inputs)

    params = unbox(jax.eval_shape(init))["params"]
    text = mb.build_text_encoder(m)
    ids = jnp.zeros((1, mb.text_config(m).context_length), jnp.int32)
    text_params = unbox(jax.eval_shape(lambda: text.init(jax.random.key(0), ids))).get("params", {})
    vae = mb.build_autoencoder(m)
    f = mb.autoencoder_factor(m)
    vae_params = unbox(jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 2 * f, 2 * f, 3))))).get(
        "params", {})
    return {"model": params, "text_encoder": text_params, "vae": vae_params}


def _fill(tree: Any, rng: np.random.Generator, scale: float) -> Any:
    def leaf(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        shape, dtype = tuple(x.shape), x.dtype
        n = rng.standard_normal(shape)
        if name == "scale":
            a = 1.0 + 0.1 * n
        elif name == "bias":
            a = 0.02 * n
        elif name == "kernel" and len(shape) >= 2:
            a = scale * n / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        else:
            a = 0.02 * n
        return np.asarray(a, dtype)

    return jax.tree_util.tree_map_with_path(leaf, tree)


def random_variables(config, seed: int = 0, mode: str | None = None, scale: float = 1.0) -> dict:
    """Random weights in the inference layout, drawn on the host (no compilation; seconds even at full size).

    Kernels are ``N(0, scale^2 / fan_in)``, norms' scales ``1 + N(0, 0.01)``, biases and embeddings
    ``N(0, 0.02^2)``. Unlike a fresh model init, the zero-initialised layers (zero convs, ``image_conv``'s last
    conv, temporal projections) are random too, so the reference image and every layer affect the output --
    what tests of the sampling machinery need.
    """
    mode = mode or (config.train.mode if "train" in config else "dreamvideo")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {MODES}")
    rng = np.random.default_rng(seed)
    ab = _abstract(config, mode)
    model = _fill(ab["model"], rng, scale)
    out = {"dreamvideo": model} if mode == "dreamvideo" else {"unet": model["unet"]}
    out["text_encoder"] = _fill(ab["text_encoder"], rng, scale)
    out["vae"] = _fill(ab["vae"], rng, scale)
    return out


# ------------------------------------------------------------------------------------------------------------
# Checkpoints


def _minimal_config(model_config, mode: str) -> ml_collections.ConfigDict:
    """A config for a converted base checkpoint given without --config: ModelScope-T2V's clip and scheduler."""
    from dreamvideo_jax.training import config as tc

    c = ml_collections.ConfigDict()
    c.num_frames, c.height, c.width = 16, 256, 256
    c.model = ml_collections.ConfigDict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    c.diffusion = tc.diffusion_defaults()
    c.train = ml_collections.ConfigDict(dict(mode=mode, prediction_type="eps"))
    return c


def _with_model(config, model_config, mode: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    new = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    old = c.model.to_dict() if "model" in c else {}
    if old and _norm(old) != _norm(new):
        log.warning("the checkpoint's model architecture differs from --config's; using the checkpoint's")
    c.model = ml_collections.ConfigDict(new)
    if "train" not in c:
        c.train = ml_collections.ConfigDict(dict(mode=mode, prediction_type="eps"))
    else:
        c.train.mode = mode
    return c


def _norm(d: dict) -> Any:
    import json

    from dreamvideo_jax.training.config import _json_default

    return json.loads(json.dumps(d, default=_json_default, sort_keys=True))


def _steps(workdir: str) -> list[int]:
    from dreamvideo_jax.training import checkpoint as ck

    if not ck.checkpoint_dir(workdir).exists():
        return []
    c = ck.Checkpointer(ck.checkpoint_dir(workdir), read_only=True, use_async=False)
    try:
        return c.all_steps()
    finally:
        c.close()


def load_workdir(workdir: str, step: int | None = None, use_ema: bool = True, name: str = "workdir") -> Loaded:
    """A training workdir's checkpoint (latest, or ``step``): its stored config and weights.

    Raises:
        InputError: naming ``--{name}``, when the workdir or the step does not exist or cannot be read.
    """
    from dreamvideo_jax.training import checkpoint as ck

    if not os.path.isdir(workdir) and "://" not in workdir:
        raise InputError(name, workdir, "no such directory")
    if not ck.is_workdir(workdir):
        raise InputError(name, workdir, "not a training workdir (config.json and base/ are missing)")
    steps = _steps(workdir)
    if step is not None and step not in steps:
        raise InputError("step", step, f"{workdir} has no checkpoint at that step (steps: {steps or 'none'})")
    try:
        config, variables = ck.load_for_inference(workdir, step=step, use_ema=use_ema)
    except ck.CheckpointError as e:
        raise InputError(name, workdir, " ".join(str(e).split())) from None
    loaded_step = step if step is not None else (steps[-1] if steps else None)
    what = "initial weights (no checkpoint yet)" if loaded_step is None else (
        f"step {loaded_step}, {'EMA' if use_ema else 'raw'} weights")
    tok = os.path.join(workdir, "tokenizer")
    return Loaded(config, variables, f"workdir {workdir}, {what}", loaded_step,
                  tok if os.path.isdir(tok) else None)


def load_base(path: str, config=None, name: str = "checkpoint") -> Loaded:
    """A base checkpoint (converted pretrained weights: ``params/`` + ``model_config.json`` [+ ``tokenizer/``])."""
    from dreamvideo_jax.training import checkpoint as ck

    try:
        params, model_config = ck.load_base(path)
    except ck.CheckpointError as e:
        raise InputError(name, path, " ".join(str(e).split())) from None
    model, rest = ck.split_base(params)
    mode = "dreamvideo" if all(k in model for k in DREAMVIDEO_KEYS) else "t2v"
    variables = {"dreamvideo": model} if mode == "dreamvideo" else {"unet": model["unet"]}
    variables.update(rest)
    cfg = _with_model(config, model_config, mode) if config is not None else _minimal_config(model_config, mode)
    tok = os.path.join(path, "tokenizer")
    return Loaded(cfg, variables, f"base checkpoint {path}", None, tok if os.path.isdir(tok) else None)


def load(*, workdir: str | None = None, checkpoint: str | None = None, step: int | None = None,
         use_ema: bool = True, config=None) -> Loaded:
    """Weights for sampling from ``workdir`` (latest or ``step``) or ``checkpoint``.

    ``checkpoint`` may be ``WORKDIR/checkpoints/<step>``, a training workdir, or a base checkpoint folder
    (converted pretrained weights). For workdirs the stored config is used (its architecture is what was
    trained); ``config``'s ``sample`` section, when given, replaces the stored one.
    """
    if workdir and checkpoint:
        raise InputError("checkpoint", checkpoint, "give either --workdir or --checkpoint, not both")
    if checkpoint:
        path = checkpoint.rstrip("/")
        from dreamvideo_jax.training import checkpoint as ck

        parent = os.path.dirname(path)
        if not os.path.exists(path) and "://" not in path:
            raise InputError("checkpoint", checkpoint, "no such file or directory")
        if ck.is_base(path):
            return load_base(path, config)
        if os.path.basename(parent) == ck.CHECKPOINT_DIR and os.path.basename(path).isdigit():
            if step is not None and step != int(os.path.basename(path)):
                raise InputError("step", step, f"differs from the step of --checkpoint={checkpoint}")
            loaded = load_workdir(os.path.dirname(parent), int(os.path.basename(path)), use_ema, name="checkpoint")
        elif ck.is_workdir(path):
            loaded = load_workdir(path, step, use_ema, name="checkpoint")
        else:
            raise InputError("checkpoint", checkpoint, "not a checkpoint: expected WORKDIR/checkpoints/<step>, a "
                                                       "training workdir, or a base folder with model_config.json")
    elif workdir:
        loaded = load_workdir(workdir, step, use_ema)
    else:
        raise InputError("workdir", workdir, "give --workdir or --checkpoint (or --random_init for a smoke test)")
    if config is not None and "sample" in config:
        loaded.config = ml_collections.ConfigDict(loaded.config.to_dict())
        loaded.config.sample = ml_collections.ConfigDict(config.sample.to_dict())
    return loaded
