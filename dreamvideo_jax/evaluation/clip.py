"""CLIP image and text embeddings for FFF_CLIP and CLIP-SIM.

- FFF_CLIP: cosine similarity between the CLIP image embeddings of a generated video's first frame and of the
  real first frame (the conditioning image), per video; report the mean.
- CLIP-SIM (CLIPSIM, Wu et al. 2021): the cosine similarity between the caption's CLIP text embedding and each
  frame's image embedding, averaged over frames, per video. Raw cosine is returned; papers that print
  "CLIPSIM" x100 or CLIPScore's ``max(100 cos, 0)`` scale it afterwards.

:class:`CLIPModel` is transformers' ``CLIPModel`` in Flax: the vision transformer written here
(:class:`CLIPVisionTransformer`: patch conv without bias, class embedding, learned position embedding,
``pre_layrnorm``, pre-LN encoder layers, ``post_layernorm`` on the class token) and the project's CLIP text tower
(:class:`dreamvideo_jax.models.text_encoder.CLIPTextEncoder` run to its last layer), pooled at the end-of-text
token, then ``visual_projection`` / ``text_projection`` (no bias) and ``logit_scale``. Parameter names are
transformers' with ``name.N`` -> ``name_N``, so :func:`load_clip` converts a ``CLIPModel`` folder (config.json +
model.safetensors, as ``save_pretrained`` writes it) with the strict converter.

Image preprocessing (:func:`clip_preprocess`) is CLIP's: resize the shortest side to 224 with PIL bicubic
(PIL antialiases when shrinking), centre crop 224x224 (offset ``(size - 224) // 2``), scale to [0, 1], normalise
with the OpenAI mean/std -- or the values in the folder's ``preprocessor_config.json``. This equals
transformers' ``CLIPImageProcessorPil`` (the PIL backend; the torchvision backend resizes with torchvision's own
bicubic and differs slightly). OpenAI's original ``clip.load`` preprocessing also uses PIL bicubic, but rounds
the crop offset (``round((size - 224) / 2)``) where this floors; the two differ by one pixel on odd margins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dreamvideo_jax.models import layers as L
from dreamvideo_jax.models.text_encoder import ACTIVATIONS, CLIPTextEncoder, TextConfig

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 32
    image_size: int = 224
    act: str = "quick_gelu"
    eps: float = 1e-5

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"VisionConfig.act={self.act!r}; use one of {sorted(ACTIVATIONS)}")
        if self.width % self.num_heads:
            raise ValueError(f"VisionConfig.width {self.width} not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size {self.image_size} not divisible by patch {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class _VisionEmbeddings(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.width,))
        patches = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                          padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embedding")(pixels)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.width)  # row-major over the patch grid, as torch's flatten(2)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, c.width)), patches], axis=1)
        pos = nn.Embed(c.num_positions, c.width, dtype=self.dtype, name="position_embedding")
        return x + pos(jnp.arange(c.num_positions)[None])


class _VisionAttention(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        head_dim = c.width // c.num_heads
        split = lambda y: y.reshape(y.shape[:-1] + (c.num_heads, head_dim))
        q, k, v = (split(nn.Dense(c.width, dtype=self.dtype, name=n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        o = jax.nn.dot_product_attention(q, k, v)  # bidirectional, scale head_dim**-0.5
        return nn.Dense(c.width, dtype=self.dtype, name="out_proj")(o.reshape(x.shape))


class _VisionMLP(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = ACTIVATIONS[c.act](nn.Dense(c.mlp_dim, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(c.width, dtype=self.dtype, name="fc2")(h)


class _VisionLayer(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        ln = lambda name: L.layer_norm(c.eps, name, self.dtype, jnp.float32)
        x = x + _VisionAttention(c, self.dtype, name="self_attn")(ln("layer_norm1")(x))
        return x + _VisionMLP(c, self.dtype, name="mlp")(ln("layer_norm2")(x))


class _VisionEncoder(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.num_layers):
            x = _VisionLayer(self.config, self.dtype, name=f"layers_{i}")(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """Normalised pixels `(B, S, S, 3)` (S = image_size) -> pooled output `(B, width)` (post-LayerNorm'd class
    token; transformers' `CLIPVisionModel(...).pooler_output`)."""

    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"CLIP vision takes (B, {c.image_size}, {c.image_size}, 3); got {pixels.shape}")
        ln = lambda name: L.layer_norm(c.eps, name, self.dtype, jnp.float32)
        x = _VisionEmbeddings(c, self.dtype, name="embeddings")(pixels)
        x = ln("pre_layrnorm")(x)  # (sic) transformers' name
        x = _VisionEncoder(c, self.dtype, name="encoder")(x)
        return ln("post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
    """transformers' `CLIPModel` in Flax: projected image / text embeddings and similarity logits."""

    text: TextConfig
    vision: VisionConfig
    projection_dim: int = 512
    eos_token_id: int = 49407  # 2 = the legacy convention: pool at the highest token id (argmax)
    dtype: Any = jnp.float32

    def setup(self):
        if self.text.output_layer is not None and self.text.output_layer != self.text.num_layers:
            raise ValueError("CLIPModel uses the text tower's last layer; set TextConfig.output_layer=None")
        self.text_model = CLIPTextEncoder(self.text, dtype=self.dtype)
        self.vision_model = CLIPVisionTransformer(self.vision, dtype=self.dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())

    def encode_image(self, pixels):
        """Normalised pixels `(B, S, S, 3)` -> image embeddings `(B, projection_dim)` (not L2-normalised)."""
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, ids):
        """Token ids `(B, L)` -> text embeddings `(B, projection_dim)` (not L2-normalised), pooled at EOT."""
        hidden = self.text_model(ids)
        if self.eos_token_id == 2:
            pos = jnp.argmax(ids, axis=-1)
        else:
            pos = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]
        return self.text_projection(pooled)

    def __call__(self, ids, pixels):
        img = _l2norm(self.encode_image(pixels))
        txt = _l2norm(self.encode_text(ids))
        logits_per_text = jnp.exp(self.logit_scale) * txt @ img.T
        return {"image_embeds": img, "text_embeds": txt, "logits_per_text": logits_per_text,
                "logits_per_image": logits_per_text.T}  # fmt: skip


def _l2norm(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# transformers folder -> configs and parameters

_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=49407)  # fmt: skip
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                        num_channels=3)  # fmt: skip


def configs_from_transformers(config: dict) -> tuple[TextConfig, VisionConfig, int, int]:
    """(TextConfig, VisionConfig, projection_dim, eos_token_id) from a transformers `CLIPConfig` dict (missing
    keys take transformers' defaults, as `CLIPConfig.from_pretrained` does)."""
    t = {**_TEXT_DEFAULTS, **(config.get("text_config") or {})}
    v = {**_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    if t["intermediate_size"] % t["hidden_size"]:
        raise ValueError(f"text intermediate_size {t['intermediate_size']} is not a multiple of hidden_size")
    if int(v["num_channels"]) != 3:
        raise ValueError("only 3-channel CLIP vision models are supported")
    text = TextConfig(vocab_size=int(t["vocab_size"]), width=int(t["hidden_size"]),
                      num_layers=int(t["num_hidden_layers"]), num_heads=int(t["num_attention_heads"]),
                      context_length=int(t["max_position_embeddings"]),
                      mlp_ratio=int(t["intermediate_size"]) // int(t["hidden_size"]), output_layer=None,
                      act=str(t["hidden_act"]), eps=float(t["layer_norm_eps"]))  # fmt: skip
    vision = VisionConfig(width=int(v["hidden_size"]), num_layers=int(v["num_hidden_layers"]),
                          num_heads=int(v["num_attention_heads"]), mlp_dim=int(v["intermediate_size"]),
                          patch_size=int(v["patch_size"]), image_size=int(v["image_size"]),
                          act=str(v["hidden_act"]), eps=float(v["layer_norm_eps"]))  # fmt: skip
    eos = t.get("eos_token_id", 49407)
    eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    return text, vision, int(config.get("projection_dim", 512)), eos


def _load_safetensors(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="flax") as f:  # handles bfloat16, which plain numpy cannot hold
        return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}


def _read_safetensors(folder: str) -> tuple[dict, str]:
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return _load_safetensors(single), single
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(_load_safetensors(os.path.join(folder, name)))
        return state, index
    raise FileNotFoundError(f"{folder}: no model.safetensors (save the transformers CLIPModel with "
                            "save_pretrained(..., safe_serialization=True))")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    size: int = 224  # shortest side after resizing
    crop: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_folder(cls, folder: str, image_size: int) -> "PreprocessConfig":
        path = os.path.join(folder, "preprocessor_config.json")
        if not os.path.isfile(path):
            return cls(size=image_size, crop=image_size)
        with open(path) as f:
            p = json.load(f)
        size = p.get("size", image_size)
        size = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
        crop = p.get("crop_size", image_size)
        crop = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
        if int(p.get("resample", 3)) != 3:
            raise ValueError(f"{path}: only bicubic (resample=3) preprocessing is implemented")
        return cls(size=int(size), crop=int(crop), mean=tuple(p.get("image_mean", OPENAI_CLIP_MEAN)),
                   std=tuple(p.get("image_std", OPENAI_CLIP_STD)))  # fmt: skip


def clip_preprocess(images, cfg: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """uint8 images `(N, H, W, 3)` (or one `(H, W, 3)`) -> float32 `(N, crop, crop, 3)` normalised pixels."""
    from PIL import Image

    imgs = np.asarray(images)
    if imgs.dtype != np.uint8:
        raise TypeError(f"clip_preprocess takes uint8 images; got {imgs.dtype}")
    if imgs.ndim == 3:
        imgs = imgs[None]
    if imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3); got {imgs.shape}")
    out = np.empty((len(imgs), cfg.crop, cfg.crop, 3), np.float32)
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    for i, img in enumerate(imgs):
        h, w = img.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = cfg.size, int(cfg.size * long / short)
        nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
        if (nh, nw) != (h, w):
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
        if min(nh, nw) < cfg.crop:
            raise ValueError(f"resized image {nh}x{nw} is smaller than the crop {cfg.crop}")
        top, left = (nh - cfg.crop) // 2, (nw - cfg.crop) // 2
        img = img[top : top + cfg.crop, left : left + cfg.crop].astype(np.float32) / 255.0
        out[i] = (img - mean) / std
    return out


def load_clip(folder: str, *, dtype=jnp.float32) -> tuple[CLIPModel, dict]:
    """(module, params) from a transformers `CLIPModel` folder (config.json + model.safetensors)."""
    from dreamvideo_jax.convert.torch_to_flax import convert_state_dict

    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder}: no config.json (expected a transformers CLIPModel folder)")
    with open(cfg_path) as f:
        text, vision, proj, eos = configs_from_transformers(json.load(f))
    model = CLIPModel(text, vision, proj, eos, dtype=dtype)
    state, where = _read_safetensors(folder)
    ids = jnp.zeros((1, text.context_length), jnp.int32)
    pix = jnp.zeros((1, vision.image_size, vision.image_size, 3), jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), ids, pix)))["params"]
    params = convert_state_dict(state, shapes, what=where, ignore=lambda k: k.endswith("position_ids"))
    params["logit_scale"] = np.asarray(params["logit_scale"], np.float32)
    return model, params


class CLIPScorer:
    """FFF_CLIP and CLIP-SIM with a converted CLIP model (jitted, batched).

    `tokenizer`: a CLIP tokenizer for captions; :meth:`from_pretrained` uses the folder's own tokenizer files
    when present, else the project's offline CLIP BPE tokenizer (the vocabulary of every OpenAI/OpenCLIP model).
    """

    def __init__(self, model: CLIPModel, params: dict, *, preprocess: Optional[PreprocessConfig] = None,
                 tokenizer=None, batch_size: int = 32):  # fmt: skip
        self.model = model
        self.params = jax.device_put(params)
        self.pre = preprocess or PreprocessConfig(size=model.vision.image_size, crop=model.vision.image_size)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self._img = jax.jit(lambda p, x: _l2norm(model.apply({"params": p}, x, method=CLIPModel.encode_image)))
        self._txt = jax.jit(lambda p, t: _l2norm(model.apply({"params": p}, t, method=CLIPModel.encode_text)))

    @classmethod
    def from_pretrained(cls, folder: str, **kw) -> "CLIPScorer":
        model, params = load_clip(folder)
        if "tokenizer" not in kw:
            from dreamvideo_jax.data import tokenizer as tok

            has_files = all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt"))
            kw["tokenizer"] = tok.load_tokenizer(folder) if has_files else tok.clip_tokenizer()
        kw.setdefault("preprocess", PreprocessConfig.from_folder(folder, model.vision.image_size))
        scorer = cls(model, params, **kw)
        scorer.source = folder  # what a MetricSuite records as its clip_model
        return scorer

    def image_embeddings(self, images) -> np.ndarray:
        """uint8 `(N, H, W, 3)` -> L2-normalised float32 `(N, projection_dim)`."""
        imgs = np.asarray(images)
        if imgs.ndim == 3:
            imgs = imgs[None]
        out = [np.asarray(self._img(self.params, clip_preprocess(imgs[i : i + self.batch_size], self.pre)))
               for i in range(0, len(imgs), self.batch_size)]  # fmt: skip
        return np.concatenate(out, 0) if out else np.zeros((0, self.model.projection_dim), np.float32)

    def token_ids(self, captions: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError("no tokenizer: pass token ids, or build the scorer with tokenizer=...")
        from dreamvideo_jax.data.tokenizer import tokenize

        return tokenize(self.tokenizer, list(captions), max_length=self.model.text.context_length)

    def text_embeddings(self, captions=None, *, ids=None) -> np.ndarray:
        """Captions (or token ids `(N, L)`) -> L2-normalised float32 `(N, projection_dim)`."""
        ids = np.asarray(ids if ids is not None else self.token_ids(captions), np.int32)
        out = [np.asarray(self._txt(self.params, ids[i : i + self.batch_size]))
               for i in range(0, len(ids), self.batch_size)]  # fmt: skip
        return np.concatenate(out, 0) if out else np.zeros((0, self.model.projection_dim), np.float32)

    def fff_clip(self, generated_first, real_first) -> np.ndarray:
        """Per-video cosine similarity of generated vs real first frames, uint8 `(N, H, W, 3)` each (sizes may
        differ: both are resized by the CLIP preprocessing)."""
        a, b = self.image_embeddings(generated_first), self.image_embeddings(real_first)
        if len(a) != len(b):
            raise ValueError(f"fff_clip: {len(a)} generated vs {len(b)} real frames")
        return np.sum(a.astype(np.float64) * b, axis=-1)

    def clip_sim(self, videos, captions=None, *, ids=None) -> np.ndarray:
        """Per-video mean over frames of cos(text, frame): uint8 videos `(N, T, H, W, 3)` and N captions."""
        v = np.asarray(videos)
        if v.ndim != 5:
            raise ValueError(f"videos must be (N, T, H, W, 3); got {v.shape}")
        txt = self.text_embeddings(captions, ids=ids)
        if len(txt) != len(v):
            raise ValueError(f"clip_sim: {len(v)} videos vs {len(txt)} captions")
        frames = self.image_embeddings(v.reshape(-1, *v.shape[2:])).reshape(len(v), v.shape[1], -1)
        return np.einsum("ntd,nd->nt", frames.astype(np.float64), txt).mean(axis=1)
