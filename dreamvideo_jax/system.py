"""The system a config describes: its networks, noise schedule, null prompt, trainable set and parameter layout.

Training (`training.Trainer`), sampling (`sampling.Sampler`), evaluation and the tools all build a `System` and
nothing else builds networks:

  system = System(config)                     # mode from config.train.mode; System(config, mode='t2v') for the base
  params = system.init(jax.random.key(0))     # boxed random init (jit it with out_shardings for sharded init)
  out = system.predict(params, x_t, t, context, image)
  trainable, frozen = system.split(params)    # system.merge(trainable, frozen) == params

The parameter layout, the only one in memory (and the base checkpoint format on disk, so loading is a read):

  {'unet': ..., 'retention': ..., 'image_conv': ..., ['reference_skip': ...,] ['last_image_conv': ...,]
   'text_encoder': ..., 'vae': ...}

* the model groups (`system.model_groups`) are what `DreamVideo.apply` takes -- `('unet',)` alone in mode 't2v'
  (the text-to-video base, also every converted ModelScope snapshot);
* 'text_encoder' is the CLIP text tower, 'vae' the autoencoder (`{}` for the parameter-free patch autoencoder).

Trainable parameters are the model leaves whose '/'-joined path (`unet/down_blocks_0/temp_convs_0/.../kernel`)
matches a `train.trainable` regex (default: `DEFAULT_TRAINABLE[mode]`); `split` returns them and the rest as two
trees with the same paths as the layout, so a checkpoint of the trainable tree merges back by path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dreamvideo_jax import config_io
from dreamvideo_jax import lora as lora_lib
from dreamvideo_jax.diffusion import schedules
from dreamvideo_jax.errors import CheckpointError
from dreamvideo_jax.models import build as model_build
from dreamvideo_jax.models.retention import init_retention_from_unet, stack_keyframes
from dreamvideo_jax.parallel import sharding
from dreamvideo_jax.tree_paths import SEP, flatten, unflatten  # noqa: F401 (re-exported: the layout's paths)

MODES = ("dreamvideo", "t2v")
TEXT_ENCODER, VAE = "text_encoder", "vae"
ENCODER_GROUPS = (TEXT_ENCODER, VAE)
BRANCH_GROUPS = ("retention", "image_conv")  # what DreamVideo adds to the base's 'unet'
LAST_FRAME_GROUP = "last_image_conv"  # model.retention.last_frame's encoder of the last frame (zero-initialised)
LAST_FRAME_TRAINABLE = r"^last_image_conv/"
# Default trainable parameters per mode (regexes over '/'-joined parameter paths of the model groups).
DEFAULT_TRAINABLE = {
    # DreamVideo: the primary U-Net's temporal layers, the whole retention branch and the image conv block.
    # With model.retention.last_frame also its encoder of the last frame (`LAST_FRAME_TRAINABLE`).
    "dreamvideo": (r"^unet/.*(temp_convs|temp_attentions|transformer_in)", r"^retention/", r"^image_conv/"),
    # Text-to-video base: the whole primary U-Net.
    "t2v": (r"^unet/",),
}

# The path of model.retention.reference_skip's gate (models/dreamvideo.py: DreamVideo.reference_skip, param
# `gate`); not in the defaults above, so a config that turns the skip on names it in train.trainable.
REFERENCE_SKIP_PARAM = "reference_skip/gate"

# Keys under `model` that change numerics or memory but not the parameter tree; they may differ on resume.
RUNTIME_MODEL_KEYS = ("dtype", "remat", "remat_policy", "attention", "frozen_dtype")

# Token ids of CLIP's start and end of text.
BOS_ID, EOS_ID = 49406, 49407


# ----------------------------------------------------------------------------------------------------------------
# Paths, trainable patterns, architecture


def config_mode(config) -> str:
    train = config.get("train") if hasattr(config, "get") else None
    return str((train or {}).get("mode", "dreamvideo"))


def trainable_patterns(config) -> tuple[str, ...]:
    train = config.get("train") or {}
    pats = tuple(train.get("trainable") or ())
    if pats:
        return pats
    mode = config_mode(config)
    model = config.get("model") if hasattr(config, "get") else None
    retention = (model or {}).get("retention") or {}
    if mode == "dreamvideo" and retention.get("last_frame", False):
        return DEFAULT_TRAINABLE[mode] + (LAST_FRAME_TRAINABLE,)
    return DEFAULT_TRAINABLE[mode]


def match_trainable(model_params: dict, patterns: tuple[str, ...]) -> frozenset[str]:
    """Paths of the model's params matched by any regex (`re.search`); every regex must match something."""
    paths = list(flatten(model_params))
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"train.trainable: {p!r} is not a valid regex ({e})") from None
    unused = [p.pattern for p in compiled if not any(p.search(k) for k in paths)]
    if unused:
        roots = sorted({k.split(SEP)[0] for k in paths})
        raise ValueError(f"train.trainable: {unused} match no parameter (paths look like {paths[0]!r}; "
                         f"top-level groups {roots})")
    out = frozenset(k for k in paths if any(p.search(k) for p in compiled))
    if not out:
        raise ValueError(f"train.trainable: {list(patterns)} select no parameter")
    return out


def architecture(config) -> dict:
    """The part of a config that fixes the trainable/frozen parameter trees and the optimizer state layout."""
    d = config_io.normalize(config_io.to_dict(config))
    model = {k: v for k, v in d.get("model", {}).items() if k not in RUNTIME_MODEL_KEYS}
    text = model.get("text")
    if text:  # only the layers that run are built: 24 layers with output_layer 23 == 23 layers
        layers = text.get("output_layer") or text.get("num_layers")
        model["text"] = {**text, "num_layers": layers, "output_layer": layers}
    if "retention" in model:  # a sampling-time knob, not a parameter shape
        model["retention"] = {k: v for k, v in model["retention"].items() if k != "conditioning_scale"}
        if not model["retention"].get("reference_skip", False):  # off == absent (checkpoints from before the key)
            model["retention"].pop("reference_skip", None)
        if not model["retention"].get("last_frame", False):
            model["retention"].pop("last_frame", None)
    train = d.get("train", {})
    mode = train.get("mode", "dreamvideo")
    pats = list(trainable_patterns(d))
    out = {"model": model, "train": {"mode": mode, "trainable": pats}}
    spec = lora_lib.spec_from_config(d)
    if spec is not None:  # adapters replace the trainable set (absent when off: older configs hash the same)
        out["train"]["lora"] = {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)}
    return out


def architecture_hash(config) -> str:
    return hashlib.sha256(json.dumps(architecture(config), sort_keys=True).encode()).hexdigest()[:16]


def architecture_diff(stored: dict, current) -> list[str]:
    return config_io.diff(architecture(stored), architecture(current))


def shape_diffs(have: Any, want: Any) -> list[str]:
    """'path: problem' lines between two trees of shapes (tuples) or arrays: missing, extra, mis-shaped."""
    def shapes(tree):
        return {k: tuple(np.shape(v)) if not isinstance(v, tuple) else v
                for k, v in flatten(jax.tree.map(lambda x: x, tree, is_leaf=lambda x: isinstance(x, tuple))).items()}

    fh, fw = shapes(have), shapes(want)
    out = [f"{k}: missing" for k in sorted(set(fw) - set(fh))]
    out += [f"{k}: not in the model" for k in sorted(set(fh) - set(fw))]
    out += [f"{k}: {fh[k]} vs {fw[k]}" for k in sorted(set(fh) & set(fw)) if fh[k] != fw[k]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The system


class System:
    """Networks, schedule, null prompt, trainable set and parameter layout of `config` (nothing allocated).

    Args:
        config: a ConfigDict with a `model` section; `train` (mode, trainable, prediction_type), `diffusion` and
            `data.pad_id` are read when present, else take their defaults.
        mode: 'dreamvideo' | 't2v' | None (= `config.train.mode`). 't2v' on a DreamVideo config runs its primary
            U-Net alone (the base the branch was trained on).
    """

    def __init__(self, config, mode: str | None = None):
        self.config = config
        self.mode = mode or config_mode(config)
        if self.mode not in MODES:
            raise ValueError(f"train.mode={self.mode!r}; use one of {MODES}")
        m = config.model
        self.model = model_build.build_dreamvideo(m)
        self.text_encoder = model_build.build_text_encoder(m)
        self.autoencoder = model_build.build_autoencoder(m)
        self.schedule = schedules.from_config(config.get("diffusion"))
        train = config.get("train") or ml_collections.ConfigDict()
        self.prediction_type = schedules.canonical_prediction_type(train.get("prediction_type", "eps"))
        data = config.get("data") or ml_collections.ConfigDict()
        self.pad_id = int(data.get("pad_id", EOS_ID))
        self.factor = model_build.autoencoder_factor(m)
        self.latent_channels = model_build.latent_channels(m)
        retention = model_build.retention_config(m)
        self.image_input = retention.image_input
        # First+last-frame conditioning (`model.retention.last_frame`; not in mode 't2v', which has no branch).
        self.last_frame = retention.last_frame and self.mode == "dreamvideo"
        self.context_length = model_build.text_config(m).context_length
        frozen = m.get("frozen_dtype", "") or ""
        self.frozen_dtype = model_build.dtype_of(frozen) if frozen else None
        # Low-rank adapters (`train.lora.rank > 0`): they are the trainable tree, the whole layout is frozen.
        self.lora = lora_lib.spec_from_config(config) if self.mode == config_mode(config) else None

    # -- identity: equal systems share compiled programs (a System is a static argument of jitted functions) --

    @functools.cached_property
    def key(self) -> str:
        arch = json.dumps(config_io.normalize(config_io.to_dict(self.config.model)), sort_keys=True)
        return hashlib.sha256(f"{arch}|{self.mode}|{self.prediction_type}".encode()).hexdigest()

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, System) and self.key == other.key

    # -- layout ----------------------------------------------------------------------------------------------

    @functools.cached_property
    def boxed_abstract(self) -> dict:
        """Boxed (logical-axis) abstract parameters in the layout; nothing is allocated."""
        return jax.eval_shape(self.init, jax.random.key(0))

    @functools.cached_property
    def abstract(self) -> dict:
        """`jax.ShapeDtypeStruct`s of every parameter in the layout."""
        return sharding.unbox(self.boxed_abstract)

    @functools.cached_property
    def lora_abstract(self) -> dict:
        """ShapeDtypeStructs of the adapter tree of `train.lora` (`{}` when LoRA is off)."""
        return lora_lib.abstract(self.model_params(self.abstract), self.lora) if self.lora else {}

    @property
    def model_groups(self) -> tuple[str, ...]:
        return tuple(k for k in self.abstract if k not in ENCODER_GROUPS)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.abstract)

    @functools.cached_property
    def trainable_paths(self) -> frozenset[str]:
        return match_trainable(self.model_params(self.abstract), trainable_patterns(self.config)
                               if self.mode == config_mode(self.config) else DEFAULT_TRAINABLE[self.mode])

    def model_params(self, params: dict) -> dict:
        """The model groups of a layout tree (what `DreamVideo.apply({'params': ...})` takes)."""
        return {k: params[k] for k in self.model_groups}

    def split(self, params: dict) -> tuple[dict, dict]:
        """A layout tree -> (trainable, frozen), both with the layout's paths."""
        flat = flatten(params)
        train = {k: v for k, v in flat.items() if k in self.trainable_paths}
        frozen = {k: v for k, v in flat.items() if k not in self.trainable_paths}
        frozen = unflatten(frozen)
        for k in self.groups:  # empty groups (the patch autoencoder's 'vae') have no leaves to carry them
            if k in params and not jax.tree.leaves(params[k]):
                frozen[k] = {}
        return unflatten(train), frozen

    @staticmethod
    def merge(trainable: dict, frozen: dict) -> dict:
        """The inverse of :meth:`split`."""
        flat = flatten(frozen)
        flat.update(flatten(trainable))
        out = unflatten(flat)
        for k, v in frozen.items():  # keep empty groups
            out.setdefault(k, v)
        return out

    def combine(self, trainable: dict, frozen: dict) -> dict:
        """The layout the model runs with: :meth:`merge` of the two halves, or with LoRA the frozen layout with the
        adapters' updates added (`lora.apply`; traceable, so the train step computes it on the fly)."""
        if self.lora is not None:
            return lora_lib.apply(frozen, [(trainable, self.lora.factor)])
        return System.merge(trainable, frozen)

    def store_frozen(self, tree: Any) -> Any:
        """Weights that are not trained, in `model.frozen_dtype` (floating arrays or ShapeDtypeStructs; others
        and everything when the key is '' pass unchanged)."""
        if self.frozen_dtype is None:
            return tree

        def cast(x):
            if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == self.frozen_dtype:
                return x
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, self.frozen_dtype, sharding=x.sharding)
            return x.astype(self.frozen_dtype)

        return jax.tree.map(cast, tree)

    def conform(self, params: dict, what: str) -> dict:
        """Loaded weights restricted to this system's groups, checked against its parameter shapes.

        Groups the system does not use (a DreamVideo checkpoint's branch when sampling its base in mode 't2v')
        are dropped; an empty 'vae' may be absent. Weights of a first-frame-only model given to a system with
        `model.retention.last_frame` get a new zero-initialised 'last_image_conv': they sample exactly as before.

        Raises:
            CheckpointError: naming `what` and the first missing or mis-shaped parameters.
        """
        out = {}
        for k in self.groups:
            if k in params:
                out[k] = params[k]
            elif not jax.tree.leaves(self.abstract[k]):
                out[k] = {}
            elif k == LAST_FRAME_GROUP and "image_conv" in params:
                out[k] = self.new_last_image_conv()
            elif k in BRANCH_GROUPS and "unet" in params:
                raise CheckpointError(f"{what} is a text-to-video model (no image-retention branch '{k}'); "
                                      "sample it in mode 't2v'")
            else:
                raise CheckpointError(f"{what} has no '{k}' parameters (it holds {sorted(params)})")
        diffs = shape_diffs(out, self.abstract)
        if diffs:
            raise CheckpointError(f"{what} does not fit the model: " + "; ".join(diffs[:5])
                                  + (f" (+{len(diffs) - 5} more)" if len(diffs) > 5 else ""))
        return out

    # -- init ------------------------------------------------------------------------------------------------

    def init(self, key: jax.Array) -> dict:
        """Random init of every parameter (boxed), the retention branch copying the primary U-Net's encoder."""
        m = self.config.model
        k_model, k_text, k_vae = jax.random.split(key, 3)
        inputs = model_build.dummy_inputs(m)
        if self.mode == "t2v":
            model = self.model.init(k_model, inputs["latents"], inputs["timesteps"], inputs["context"],
                                    method="unet_only")["params"]
        else:
            model = self.model.init(k_model, **inputs)["params"]
            copied = init_retention_from_unet(sharding.unbox(model))
            model = jax.tree.map(lambda box, v: box.replace_boxed(v) if sharding.is_boxed(box) else v,
                                 model, copied, is_leaf=sharding.is_boxed)
        ids = jnp.zeros((1, self.context_length), jnp.int32)
        text = self.text_encoder.init(k_text, ids).get("params", {})
        f = self.factor
        vae = self.autoencoder.init(k_vae, jnp.zeros((1, 2 * f, 2 * f, 3), jnp.float32)).get("params", {})
        return {**dict(model), TEXT_ENCODER: text, VAE: vae}

    def random_params(self, seed: int = 0, scale: float = 1.0) -> dict:
        """Random weights drawn on the host (no compilation; seconds even at full size), numpy, in the layout.

        Kernels are ``N(0, scale^2 / fan_in)``, norms' scales ``1 + N(0, 0.01)``, biases and embeddings
        ``N(0, 0.02^2)``. Unlike :meth:`init`, the zero-initialised layers (zero convs, `image_conv`'s last conv,
        temporal projections) are random too, so the reference image and every layer affect the output -- what
        tests and benchmarks of the sampling machinery need.
        """
        rng = np.random.default_rng(seed)

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

        return {k: jax.tree_util.tree_map_with_path(leaf, v) for k, v in self.abstract.items()}

    def new_last_image_conv(self, seed: int = 0) -> dict:
        """A freshly initialised 'last_image_conv' group (its output conv is zero: it adds nothing yet)."""
        return jax.device_get(model_build.init_last_image_conv(self.config.model, jax.random.key(seed)))

    @staticmethod
    def copy_retention_from_unet(params: dict) -> dict:
        """The layout with the retention branch re-initialised from the primary U-Net's encoder."""
        return init_retention_from_unet(params)

    # -- networks --------------------------------------------------------------------------------------------

    def predict(self, params: dict, x_t, timesteps, context, image=None, *, train: bool = False,
                rngs: dict | None = None):
        """The model's prediction for noisy latents `x_t` `(B, F, h, w, C)` (mode 't2v' ignores `image`)."""
        variables = {"params": self.model_params(params)}
        if self.mode == "t2v":
            return self.model.apply(variables, x_t, timesteps, context, train=train, rngs=rngs, method="unet_only")
        return self.model.apply(variables, x_t, timesteps, context, image, train=train, rngs=rngs)

    def model_image(self, reference, last=None, given=None):
        """The model's image input from the reference image (pixels or latent, per `image_input`) and optionally
        the last frame's, with `given` `(B,)` saying which samples have one: `reference` itself, or with
        `model.retention.last_frame` the stack `[reference, last, given]` (`retention.stack_keyframes`)."""
        if not self.last_frame:
            if last is not None:
                raise ValueError("this model has no last-frame input (model.retention.last_frame is False)")
            return reference
        return stack_keyframes(reference, last, given)

    def encode_text(self, params: dict, ids):
        """Token ids `(B, L)` -> text embeddings `(B, L, D)`."""
        text = params[TEXT_ENCODER]
        return self.text_encoder.apply({"params": text} if text else {}, ids)

    def vae_variables(self, params: dict) -> dict:
        vae = params.get(VAE) or {}
        return {"params": vae} if vae else {}

    def image_latent(self, params: dict, images):
        """Reference images `(B, H, W, 3)` in [-1, 1] -> their (scaled) latents `(B, h, w, C)` (posterior mean)."""
        return self.autoencoder.apply(self.vae_variables(params), images, None, method="latents")

    def null_tokens(self) -> np.ndarray:
        """Token ids of the empty prompt "": <|startoftext|> <|endoftext|> then padding, shape (1, L)."""
        ids = np.full((1, self.context_length), self.pad_id, np.int32)
        ids[0, 0], ids[0, 1] = BOS_ID, EOS_ID
        return ids
