"""Numerical parity with the PyTorch reference (diffusers / transformers), float32.

Tiny reference models are built and randomised in the test (zero-initialised layers perturbed so every path
matters), their state dicts converted with the strict converter, and outputs compared within
max|diff| <= 1e-4 * max|ref| + 1e-5.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dreamvideo_jax.convert.torch_to_flax import convert_state_dict  # noqa: E402
from dreamvideo_jax.models.text_encoder import CLIPTextEncoder, TextConfig  # noqa: E402
from dreamvideo_jax.models.unet3d import UNet3D, UNetConfig, skip_shapes  # noqa: E402
from dreamvideo_jax.models.vae import AutoencoderKL, VAEConfig  # noqa: E402

CROSS, PLAIN = "CrossAttnDownBlock3D", "DownBlock3D"
UNET_CONFIGS = {
    "2-level-1-layer": dict(block_out_channels=(16, 32), down_block_types=(CROSS, PLAIN),
                            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1,
                            norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8),
    "3-level-2-layers": dict(block_out_channels=(16, 32, 32), down_block_types=(CROSS, CROSS, PLAIN),
                             up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
                             layers_per_block=2, norm_num_groups=8, cross_attention_dim=24, attention_head_dim=8),
}


def _close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err, tol = np.abs(ours - ref).max(), 1e-4 * np.abs(ref).max() + 1e-5
    assert err <= tol, f"max|diff| {err:.3g} > tol {tol:.3g}"


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


def _state(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet3d_matches_diffusers(name):
    kw = UNET_CONFIGS[name]
    torch.manual_seed(0)
    ref = _randomise(diffusers.UNet3DConditionModel(in_channels=4, out_channels=4, **kw))
    cfg = UNetConfig(in_channels=4, out_channels=4, **kw)
    model = UNet3D(cfg)
    b, f, h, w = 2, 3, 12, 10  # odd frame count, H != W, a level whose size is not a multiple of 2
    rng = np.random.RandomState(0)
    x = rng.randn(b, f, h, w, 4).astype(np.float32)
    t = np.array([10, 700])
    ctx = rng.randn(b, 5, kw["cross_attention_dim"]).astype(np.float32)
    res = [rng.randn(*s).astype(np.float32) * 0.5 for s in skip_shapes(cfg, b, f, h, w)]
    mid_shape = res[-1].shape[:-1] + (kw["block_out_channels"][-1],)
    mid = rng.randn(*mid_shape).astype(np.float32) * 0.5

    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, ctx)))["params"]
    params = convert_state_dict(_state(ref), shapes, what=name)
    apply = jax.jit(model.apply)

    to_torch_video = lambda a: torch.from_numpy(a).permute(0, 4, 1, 2, 3)
    to_torch_frames = lambda a: torch.from_numpy(a.reshape((-1,) + a.shape[2:])).permute(0, 3, 1, 2)
    from_torch_video = lambda y: y.permute(0, 2, 3, 4, 1).numpy()
    with torch.no_grad():
        plain = from_torch_video(ref(to_torch_video(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
        with_res = from_torch_video(ref(
            to_torch_video(x), torch.from_numpy(t), torch.from_numpy(ctx),
            down_block_additional_residuals=tuple(to_torch_frames(r) for r in res),
            mid_block_additional_residual=to_torch_frames(mid)).sample)
    _close(apply({"params": params}, x, t, ctx), plain)
    _close(apply({"params": params}, x, t, ctx, res, mid), with_res)
    assert np.abs(with_res - plain).max() > 1e-3  # the residuals do something


def test_autoencoder_kl_matches_diffusers():
    torch.manual_seed(0)
    kw = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4)
    ref = _randomise(diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3,
                                             up_block_types=("UpDecoderBlock2D",) * 3, **kw))
    cfg = VAEConfig(**kw)
    vae = AutoencoderKL(cfg)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: vae.init(jax.random.key(0), x)))["params"]
    params = convert_state_dict(_state(ref), shapes, what="AutoencoderKL")
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        mean = dist.mean.permute(0, 2, 3, 1).numpy()
        logvar = dist.logvar.permute(0, 2, 3, 1).numpy()
        decoded = ref.decode(torch.from_numpy(mean).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    ours_mean, ours_logvar = jax.jit(lambda p, a: vae.apply(p, a, method="encode"))({"params": params}, x)
    _close(ours_mean, mean)
    _close(ours_logvar, logvar)
    ours_dec = jax.jit(lambda p, z: vae.apply(p, z, method="decode"))({"params": params}, mean * cfg.scaling_factor)
    _close(ours_dec, decoded)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_text_encoder_matches_transformers(act):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    ref = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                                       bos_token_id=998, eos_token_id=999, pad_token_id=999)).eval()
    ids = np.random.RandomState(0).randint(0, 1000, (2, 77))
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
        last = out.last_hidden_state.numpy()
        # "penultimate" as ModelScope: hidden state after layer 2 of 3, then the final LayerNorm.
        penultimate = ref.final_layer_norm(out.hidden_states[2]).numpy()
    state = {k.removeprefix("text_model."): v for k, v in _state(ref).items()}
    for output_layer, expected in ((None, last), (2, penultimate)):
        enc = CLIPTextEncoder(TextConfig(vocab_size=1000, width=32, num_layers=3, num_heads=4, act=act,
                                         output_layer=output_layer))
        shapes = nn.meta.unbox(jax.eval_shape(lambda: enc.init(jax.random.key(0), ids)))["params"]
        unused = lambda k: k.endswith("position_ids") or (output_layer == 2 and k.startswith("encoder.layers.2."))
        params = convert_state_dict(state, shapes, what="CLIPTextModel", ignore=unused)
        _close(jax.jit(enc.apply)({"params": params}, ids), expected)


@pytest.mark.parametrize("heads", [1, 4])
def test_text_time_embedding_matches_diffusers(heads):
    """The pooled-caption time embedding (diffusers `addition_embed_type="text"`), converted by the strict
    converter: attention pooling with a mean-token query, projection, LayerNorms."""
    from diffusers.models.embeddings import TextTimeEmbedding as RefTextTime

    from dreamvideo_jax.models.layers import TextTimeEmbedding

    torch.manual_seed(0)
    ref = _randomise(RefTextTime(encoder_dim=24, time_embed_dim=40, num_heads=heads))
    ctx = np.random.RandomState(1).randn(3, 7, 24).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ctx)).numpy()
    ours = TextTimeEmbedding(40, heads)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: ours.init(jax.random.key(0), ctx)))["params"]
    params = convert_state_dict(_state(ref), shapes, what="TextTimeEmbedding")
    _close(jax.jit(ours.apply)({"params": params}, ctx), expected)


def test_converter_names_every_problem():
    from dreamvideo_jax.convert.torch_to_flax import ConversionError

    enc = CLIPTextEncoder(TextConfig(vocab_size=50, width=8, num_layers=1, num_heads=2, output_layer=None))
    ids = jnp.zeros((1, 77), jnp.int32)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: enc.init(jax.random.key(0), ids)))["params"]
    good = {"embeddings.token_embedding.weight": np.zeros((50, 8)),
            "embeddings.position_embedding.weight": np.zeros((77, 8)),
            "final_layer_norm.weight": np.ones(8), "final_layer_norm.bias": np.zeros(8)}
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
        good[f"encoder.layers.0.self_attn.{n}.weight"] = np.zeros((8, 8))
        good[f"encoder.layers.0.self_attn.{n}.bias"] = np.zeros(8)
    for n in ("layer_norm1", "layer_norm2"):
        good[f"encoder.layers.0.{n}.weight"] = np.ones(8)
        good[f"encoder.layers.0.{n}.bias"] = np.zeros(8)
    good.update({"encoder.layers.0.mlp.fc1.weight": np.zeros((32, 8)), "encoder.layers.0.mlp.fc1.bias": np.zeros(32),
                 "encoder.layers.0.mlp.fc2.weight": np.zeros((8, 32)), "encoder.layers.0.mlp.fc2.bias": np.zeros(8)})
    convert_state_dict(good, shapes)  # complete and consistent
    bad = dict(good)
    del bad["final_layer_norm.bias"]
    bad["encoder.layers.0.mlp.fc1.weight"] = np.zeros((31, 8))
    bad["extra.weight"] = np.zeros(3)
    with pytest.raises(ConversionError) as e:
        convert_state_dict(bad, shapes, what="text_encoder/model.safetensors")
    msg = str(e.value)
    assert "text_encoder/model.safetensors" in msg
    assert "final_layer_norm/bias" in msg and "extra.weight" in msg and "encoder.layers.0.mlp.fc1.weight" in msg
