"""Model core: shapes, zero-init invariants, temporal identity, causality, autoencoders, gradient flow."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import tiny
from dreamvideo_jax.models import build
from dreamvideo_jax.models.retention import init_retention_from_unet
from dreamvideo_jax.models.unet3d import UNetConfig, skip_shapes
from dreamvideo_jax.models.vae import PatchAutoencoder, PatchConfig, decode_video, encode_video

# Default trainable subset of DreamVideo: primary temporal layers + retention branch + image_conv.
TRAINABLE = (r"^unet/.*(temp_convs|temp_attentions|transformer_in)", r"^retention/", r"^image_conv/")


@pytest.fixture(scope="module")
def cfg():
    return tiny.get_config().model


@pytest.fixture(scope="module")
def model(cfg):
    return build.build_dreamvideo(cfg)


@pytest.fixture(scope="module")
def params(cfg):
    return nn.meta.unbox(build.init_dreamvideo(cfg, jax.random.key(0))["params"])


@pytest.fixture(scope="module")
def apply(model):
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def apply_unet(model):
    return jax.jit(lambda v, x, t, c: model.apply(v, x, t, c, method="unet_only"))


def _inputs(cfg, b, f, h, w, seed=0):
    rng = np.random.RandomState(seed)
    lc = build.latent_channels(cfg)
    factor = build.autoencoder_factor(cfg)
    x = rng.randn(b, f, h, w, lc).astype(np.float32)
    t = rng.randint(0, 1000, (b,))
    c = rng.randn(b, 77, cfg.text.width).astype(np.float32)
    img = rng.uniform(-1, 1, (b, h * factor, w * factor, 3)).astype(np.float32)
    return x, t, c, img


def _perturb(tree, key, scale=0.05):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("b,f,h,w", [(1, 1, 3, 5), (2, 3, 6, 4)])
def test_shapes_finite(cfg, params, apply, b, f, h, w):
    x, t, c, img = _inputs(cfg, b, f, h, w)
    out = apply({"params": params}, x, t, c, img)
    assert out.shape == x.shape
    assert np.isfinite(np.asarray(out)).all()


def test_init_equals_primary_and_zero_convs_matter(cfg, params, apply, apply_unet):
    x, t, c, img = _inputs(cfg, 2, 3, 4, 4)
    full = np.asarray(apply({"params": params}, x, t, c, img))
    primary = np.asarray(apply_unet({"params": params}, x, t, c))
    np.testing.assert_array_equal(full, primary)
    # Perturbing only the zero convs (with image_conv left at zero) changes the output.
    branch = dict(params["retention"])
    for k in branch:
        if k.startswith("controlnet_"):
            branch[k] = _perturb(branch[k], jax.random.key(1))
    changed = np.asarray(apply({"params": {**params, "retention": branch}}, x, t, c, img))
    assert np.abs(changed - primary).max() > 1e-4
    # The reference image then matters too, once image_conv's last conv is non-zero.
    ic = dict(params["image_conv"])
    ic["conv_out"] = _perturb(ic["conv_out"], jax.random.key(2))
    p2 = {**params, "retention": branch, "image_conv": ic}
    a = np.asarray(apply({"params": p2}, x, t, c, img))
    b = np.asarray(apply({"params": p2}, x, t, c, -img))
    assert np.abs(a - b).max() > 1e-5


def test_reference_skip_starts_at_zero_and_adds_the_gated_latent_to_every_frame():
    m = tiny.get_config().model
    m.retention.image_input = "latent"
    m.retention.reference_skip = True
    model = build.build_dreamvideo(m)
    params = nn.meta.unbox(build.init_dreamvideo(m, jax.random.key(0))["params"])
    lc = build.latent_channels(m)
    assert params["reference_skip"]["gate"].shape == (lc,) and not np.asarray(params["reference_skip"]["gate"]).any()
    x, t, c, _ = _inputs(m, 2, 3, 4, 4)
    latent = np.random.RandomState(3).randn(2, 4, 4, lc).astype(np.float32)
    apply = jax.jit(model.apply)
    primary = np.asarray(jax.jit(lambda v, *a: model.apply(v, *a, method="unet_only"))({"params": params}, x, t, c))
    np.testing.assert_array_equal(np.asarray(apply({"params": params}, x, t, c, latent)), primary)
    gate = np.linspace(-1, 1, lc).astype(np.float32)
    gated = np.asarray(apply({"params": {**params, "reference_skip": {"gate": gate}}}, x, t, c, latent))
    np.testing.assert_allclose(gated - primary, np.broadcast_to(gate * latent[:, None], x.shape), atol=1e-5)
    # A dropped image condition (zeros) adds nothing.
    dropped = np.asarray(apply({"params": {**params, "reference_skip": {"gate": gate}}}, x, t, c, np.zeros_like(latent)))
    np.testing.assert_array_equal(dropped, primary)


def test_fresh_unet_is_frame_by_frame(cfg, params, apply_unet):
    x, t, c, _ = _inputs(cfg, 2, 4, 4, 4, seed=3)
    whole = np.asarray(apply_unet({"params": params}, x, t, c))
    for i in range(x.shape[1]):
        single = np.asarray(apply_unet({"params": params}, x[:, i:i + 1], t, c))
        np.testing.assert_allclose(whole[:, i:i + 1], single, rtol=1e-5, atol=1e-5)
    # Once the temporal layers are trained (non-zero), frames interact.
    trained = dict(params["unet"])
    for k in ("down_blocks_0", "mid_block"):
        trained[k] = _perturb(trained[k], jax.random.key(4))
    mixed = np.asarray(apply_unet({"params": {**params, "unet": trained}}, x, t, c))
    alone = np.asarray(apply_unet({"params": {**params, "unet": trained}}, x[:, :1], t, c))
    assert np.abs(mixed[:, :1] - alone).max() > 1e-4


def test_retention_is_copy_of_primary_encoder(params):
    for k in ("conv_in", "time_embedding", "transformer_in", "down_blocks_0", "down_blocks_1", "mid_block"):
        a, b = jax.tree.leaves(params["unet"][k]), jax.tree.leaves(params["retention"][k])
        assert all(np.array_equal(x, y) for x, y in zip(a, b)), k
    assert not any(k.startswith("up_blocks") for k in params["retention"])
    copied = init_retention_from_unet(params)
    leaf = lambda p: p["retention"]["conv_in"]["kernel"]
    assert leaf(copied) is not params["unet"]["conv_in"]["kernel"]


def test_text_time_embedding_conditions_every_frame_and_is_copied(cfg):
    """addition_embed_type="text": the pooled caption enters the time embedding of the U-Net and of the branch
    (a copy), so changing only the caption changes every frame even with cross-attention's output zeroed."""
    m = cfg.copy_and_resolve_references()
    m.unet.addition_embed_type, m.unet.addition_embed_type_num_heads = "text", 4
    model = build.build_dreamvideo(m)
    p = nn.meta.unbox(build.init_dreamvideo(m, jax.random.key(0))["params"])
    assert set(p["unet"]["add_embedding"]) == {"norm1", "pool", "proj", "norm2"}
    for a, b in zip(jax.tree.leaves(p["unet"]["add_embedding"]), jax.tree.leaves(p["retention"]["add_embedding"])):
        assert np.array_equal(a, b)
    flat = traverse_util.flatten_dict(p, sep="/")
    no_attn2 = {k: (np.zeros_like(v) if "/attn2/to_out_0/" in k else v) for k, v in flat.items()}
    assert any("/attn2/to_out_0/" in k for k in flat)
    x, t, c, img = _inputs(cfg, 1, 3, 4, 4, seed=7)
    c2 = np.random.RandomState(8).randn(*c.shape).astype(np.float32)
    run = jax.jit(lambda q, ctx: model.apply({"params": q}, x, t, ctx, img))
    q = traverse_util.unflatten_dict(no_attn2, sep="/")
    diff = np.abs(np.asarray(run(q, c)) - np.asarray(run(q, c2))).max(axis=(2, 3, 4))
    assert np.all(diff > 1e-4), diff


def test_residual_count_and_shapes(cfg):
    full = UNetConfig()
    assert full.num_skips == 12
    u = build.unet_config(cfg)
    shapes = skip_shapes(u, 2, 3, 6, 5)
    assert len(shapes) == u.num_skips
    model = build.build_unet(cfg)
    x, t, c, _ = _inputs(cfg, 2, 3, 6, 5)
    bad = [jnp.zeros(s) for s in shapes[:-1]]
    with pytest.raises(ValueError, match="skip connections"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, c, bad))


def test_gradients_reach_every_trainable_param(cfg, model, params):
    # Zero-initialised layers block gradients at init (by design), so train from a perturbed point.
    p = _perturb(params, jax.random.key(5), 0.02)
    flat = traverse_util.flatten_dict(p, sep="/")
    is_trainable = lambda k: any(re.search(r, k) for r in TRAINABLE)
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    assert trainable and frozen
    x, t, c, img = _inputs(cfg, 1, 3, 4, 4, seed=6)

    @jax.jit
    def grads(tr):
        full = traverse_util.unflatten_dict({**frozen, **tr}, sep="/")
        return jax.grad(lambda q: jnp.mean(model.apply({"params": q}, x, t, c, img) ** 2))(full)

    g = traverse_util.flatten_dict(grads(trainable), sep="/")
    dead = [k for k in trainable if not np.any(np.asarray(g[k]))]
    assert not dead, f"no gradient reaches {dead}"


def test_full_size_matches_diffusers_parameter_tree():
    torch = pytest.importorskip("torch")
    from diffusers import UNet3DConditionModel

    from configs import modelscope_t2v
    from dreamvideo_jax.convert.torch_to_flax import plan_conversion

    with torch.device("meta"):
        ref = UNet3DConditionModel()
    src = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    m = modelscope_t2v.get_config().model
    unet = build.build_unet(m)
    inputs = build.dummy_inputs(m)
    shapes = nn.meta.unbox(build.abstract_variables(unet, inputs["latents"], inputs["timesteps"],
                                                    inputs["context"]))["params"]
    plan = plan_conversion(src, shapes, what="UNet3DConditionModel()")  # raises on any mismatch
    assert len(plan) == len(src)
    ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    theirs = sum(int(np.prod(s)) for s in src.values())
    assert ours == theirs


def test_text_encoder_is_causal(cfg):
    enc = build.build_text_encoder(cfg)
    ids = np.random.RandomState(0).randint(0, cfg.text.vocab_size, (2, 77))
    v = jax.jit(enc.init)(jax.random.key(0), ids)
    f = jax.jit(enc.apply)
    a = np.asarray(f(v, ids))
    k = 30
    ids2 = ids.copy()
    ids2[:, k] = (ids2[:, k] + 1) % cfg.text.vocab_size
    b = np.asarray(f(v, ids2))
    np.testing.assert_array_equal(a[:, :k], b[:, :k])
    assert np.abs(a[:, k:] - b[:, k:]).max() > 1e-4
    assert a.shape == (2, 77, cfg.text.width)


def test_patch_autoencoder_roundtrip_exact():
    ae = PatchAutoencoder(PatchConfig(patch_size=4, scaling_factor=1.0))
    video = np.random.RandomState(0).uniform(-1, 1, (2, 3, 16, 8, 3)).astype(np.float32)
    z = encode_video(ae, {}, video)
    assert z.shape == (2, 3, 4, 2, 48)
    np.testing.assert_array_equal(np.asarray(decode_video(ae, {}, z)), video)
    np.testing.assert_array_equal(np.asarray(decode_video(ae, {}, z, chunk_size=4)), video)
    with pytest.raises(ValueError, match="patch_size"):
        ae.apply({}, video[0, :, :15], method="encode")


def test_kl_vae_shapes_and_chunked_decode(cfg):
    vae = build.build_autoencoder(cfg)
    video = np.random.RandomState(0).uniform(-1, 1, (1, 3, 16, 12, 3)).astype(np.float32)
    v = jax.jit(vae.init)(jax.random.key(0), video[0])
    z_mean = encode_video(vae, v, video)
    z_sample = encode_video(vae, v, video, key=jax.random.key(1))
    assert z_mean.shape == (1, 3, 8, 6, 4)
    assert np.isfinite(np.asarray(z_sample)).all() and np.abs(np.asarray(z_sample - z_mean)).max() > 0
    whole = np.asarray(decode_video(vae, v, z_mean))
    chunked = np.asarray(decode_video(vae, v, z_mean, chunk_size=2))
    assert whole.shape == video.shape and np.isfinite(whole).all()
    np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-5)


def test_bad_configs_name_the_problem(cfg):
    with pytest.raises(ValueError, match="block_out_channels"):
        UNetConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock3D",))
    bad = tiny.get_config().model
    bad.text.width = 48
    with pytest.raises(ValueError, match="cross_attention_dim"):
        build.build_dreamvideo(bad)
    bad = tiny.get_config().model
    bad.retention.image_conv_channels = (8, 16, 32)
    with pytest.raises(ValueError, match="image_conv_channels"):
        build.build_dreamvideo(bad)
    bad = tiny.get_config().model
    bad.retention.reference_skip = True  # with image_input='pixels'
    with pytest.raises(ValueError, match="reference_skip=True .* needs image_input='latent', got 'pixels'"):
        build.build_dreamvideo(bad)
    bad = tiny.get_config().model
    bad.unet.nonexistent = 1
    with pytest.raises(ValueError, match="nonexistent"):
        build.build_dreamvideo(bad)


def test_bfloat16_compute_and_frozen_storage_stay_close_to_float32():
    """`model.dtype='bfloat16'` with `model.frozen_dtype='bfloat16'` (the accelerator setting: bf16 activations,
    frozen weights stored in bf16, trainable master weights float32) against float32: the relative error of the
    DreamVideo output is reported and bounded by bf16's precision, and only the frozen half changes dtype."""
    from dreamvideo_jax.system import System

    c32 = tiny.get_config()
    c16 = tiny.get_config()
    c16.model.dtype, c16.model.frozen_dtype = "bfloat16", "bfloat16"
    s32, s16 = System(c32), System(c16)
    assert s16.key != s32.key and build.dtype_of("bfloat16") == jnp.bfloat16
    params = s32.random_params(0)
    trainable, frozen = s16.split(params)
    stored = s16.store_frozen(frozen)
    assert {x.dtype for x in jax.tree.leaves(stored)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(s32.store_frozen(frozen))} == {jnp.dtype(jnp.float32)}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 8, 8, 4)).astype(np.float32)
    t = np.array([500], np.int32)
    text = rng.normal(size=(1, 77, c32.model.unet.cross_attention_dim)).astype(np.float32)
    px = 8 * s32.factor
    image = rng.uniform(-1, 1, size=(1, px, px, 3)).astype(np.float32) if s32.image_input == "pixels" else x[:, 0]
    ref = np.asarray(jax.jit(s32.predict)(params, x, t, text, image))
    out = np.asarray(jax.jit(s16.predict)(s16.merge(trainable, stored), x, t, text, image)).astype(np.float32)
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    print(f"bf16 vs float32 relative error of the DreamVideo output: {rel:.2e}")
    assert 1e-4 < rel < 3e-2  # bf16 has 8 bits of mantissa (~4e-3 per rounding); not identical, not broken
