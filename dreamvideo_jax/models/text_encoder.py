"""CLIP text transformer in Flax, with transformers' `CLIPTextModel` parameter names.

ModelScope-T2V conditions on the OpenCLIP ViT-H/14 text tower (width 1024, 16 heads, 24 layers, 77 tokens,
exact GELU) and takes the output of layer 23 followed by the final LayerNorm ("penultimate"). Layers after
`output_layer` are never built, so a converted 23-layer diffusers `text_encoder/` and a 24-layer OpenCLIP
tower give the same parameter tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dreamvideo_jax.models import layers as L
from dreamvideo_jax.models.attention import dot_product_attention
from dreamvideo_jax.parallel import axes as ax

ACTIVATIONS = {
    "gelu": L.gelu,  # exact erf GELU (OpenCLIP ViT-H, SD-2 text encoders)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    context_length: int = 77
    mlp_ratio: int = 4
    output_layer: Optional[int] = 23  # run this many layers, then final LayerNorm; None = all
    act: str = "gelu"
    eps: float = 1e-5

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"TextConfig.act={self.act!r}; use one of {sorted(ACTIVATIONS)}")
        if self.width % self.num_heads:
            raise ValueError(f"TextConfig.width {self.width} not divisible by num_heads {self.num_heads}")
        if self.output_layer is not None and not 1 <= self.output_layer <= self.num_layers:
            raise ValueError(f"TextConfig.output_layer={self.output_layer} must be in [1, {self.num_layers}]")

    @property
    def layers_run(self) -> int:
        return self.num_layers if self.output_layer is None else self.output_layer



class CLIPEmbeddings(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        c = self.config
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(c.vocab_size, c.width, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=nn.with_logical_partitioning(init, (ax.VOCAB, ax.EMBED)),
                       name="token_embedding")
        pos = nn.Embed(c.context_length, c.width, dtype=self.dtype, param_dtype=self.param_dtype,
                       embedding_init=nn.with_logical_partitioning(init, (ax.POSITION, ax.EMBED)),
                       name="position_embedding")
        return tok(ids) + pos(jnp.arange(ids.shape[1])[None])


class CLIPAttention(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # attention implementation (models/attention.py; config key model.attention)

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        head_dim = c.width // c.num_heads
        split = lambda y: y.reshape(y.shape[:-1] + (c.num_heads, head_dim))
        q, k, v = (split(L.dense(c.width, n, axes=(ax.EMBED, ax.HEADS), **kw)(x)) for n in ("q_proj", "k_proj", "v_proj"))
        o = dot_product_attention(q, k, v, is_causal=True, implementation=self.attention)
        return L.dense(c.width, "out_proj", axes=(ax.HEADS, ax.EMBED), **kw)(o.reshape(x.shape))


class CLIPEncoderLayer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # attention implementation (models/attention.py; config key model.attention)

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = CLIPAttention(c, name="self_attn", attention=self.attention, **kw)
        x = x + attn(L.layer_norm(c.eps, "layer_norm1", **kw)(x))
        h = L.layer_norm(c.eps, "layer_norm2", **kw)(x)
        h = _MLP(c, name="mlp", **kw)(h)
        return x + h


class _MLP(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = ACTIVATIONS[c.act](L.dense(c.mlp_ratio * c.width, "fc1", **kw)(x))
        return L.dense(c.width, "fc2", axes=(ax.MLP, ax.EMBED), **kw)(h)


class _Encoder(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # attention implementation (models/attention.py; config key model.attention)

    @nn.compact
    def __call__(self, x):
        for i in range(self.config.layers_run):
            x = CLIPEncoderLayer(self.config, name=f"layers_{i}", dtype=self.dtype, param_dtype=self.param_dtype,
                                 attention=self.attention)(x)
        return x


class CLIPTextEncoder(nn.Module):
    """Token ids `(B, L)` (L <= context_length) -> hidden states `(B, L, width)` of `output_layer`, then the
    final LayerNorm (= transformers' `last_hidden_state` of a model truncated to that many layers)."""

    config: TextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"  # attention implementation (models/attention.py; config key model.attention)

    @nn.compact
    def __call__(self, ids):
        c = self.config
        if ids.ndim != 2 or ids.shape[1] > c.context_length:
            raise ValueError(f"token ids must be (B, L) with L <= {c.context_length}; got shape {tuple(ids.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPEmbeddings(c, name="embeddings", **kw)(ids)
        x = _Encoder(c, name="encoder", attention=self.attention, **kw)(x)
        return L.layer_norm(c.eps, "final_layer_norm", **kw)(x)
