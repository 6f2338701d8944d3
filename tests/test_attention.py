"""Attention (models/attention.py).

The closed form ('closed_form', CPU's): same values and gradients as torch's SDPA and as autodiff of
`jax.nn.dot_product_attention`, causal and cross-attention shapes, and errors that name the shapes.

The accelerator implementations (`model.attention`): 'xla' and 'splash' (its Pallas TPU kernels run in the
interpreter) against a plain softmax reference, forward and gradients, on the model's shapes (self-attention,
cross-attention to 77 text tokens, temporal attention over 16 frames, causal text attention); splash under a mesh;
nothing of size (B, N, T, S) kept for the backward; the 'auto' rule; the tiny U-Net with each implementation;
config errors; and 'cudnn' where a GPU is present.
"""

import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dreamvideo_jax.models import attention as A
from dreamvideo_jax.models.attention import dot_product_attention

# (B, T, S, N, H): self-attention, cross-attention to a short context, temporal attention (many short sequences)
SHAPES = [(2, 40, 40, 2, 8), (3, 24, 7, 4, 8), (16, 5, 5, 1, 16)]


def _inputs(b, t, s, n, h, seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    q, kk, v = (jax.random.normal(k[0], (b, t, n, h)) * 2, jax.random.normal(k[1], (b, s, n, h)) * 2,
                jax.random.normal(k[2], (b, s, n, h)))
    return q.astype(dtype), kk.astype(dtype), v.astype(dtype), jax.random.normal(k[3], (b, t, n, h))


def _close(ours, ref, rel=1e-5):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape
    err, tol = np.abs(ours - ref).max(), rel * np.abs(ref).max() + 1e-6
    assert err <= tol, f"max|diff| {err:.3g} > tol {tol:.3g}"


# causal attention is square: the self-attention shapes only
@pytest.mark.parametrize("shape,causal", [(x, c) for x in SHAPES for c in (False, True) if not c or x[1] == x[2]])
def test_values_and_gradients_match_torch_sdpa(shape, causal):
    torch = pytest.importorskip("torch")
    q, k, v, w = _inputs(*shape)
    loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, is_causal=causal) * w)
    out = dot_product_attention(q, k, v, is_causal=causal)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    tq, tk, tv = (torch.tensor(np.asarray(x)).permute(0, 2, 1, 3).double().requires_grad_() for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
    (ref * torch.tensor(np.asarray(w)).permute(0, 2, 1, 3).double()).sum().backward()
    back = lambda x: x.detach().permute(0, 2, 1, 3).numpy()
    _close(out, back(ref))
    for ours, t in zip(grads, (tq, tk, tv)):
        _close(ours, back(t.grad))


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_gradients_match_autodiff_of_jax_reference_under_jit(shape):
    q, k, v, w = _inputs(*shape, seed=1)
    ours = jax.jit(jax.grad(lambda *a: jnp.sum(dot_product_attention(*a) * w), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        _close(a, b, rel=1e-5)


def test_bfloat16_in_bfloat16_out_with_float32_softmax():
    q, k, v, w = _inputs(*SHAPES[0])
    lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = dot_product_attention(*lo)
    grads = jax.grad(lambda *a: jnp.sum(dot_product_attention(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(*lo)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    _close(out.astype(jnp.float32), dot_product_attention(*(x.astype(jnp.float32) for x in lo)), rel=2e-2)


def test_bad_shapes_name_them():
    q, k, v, _ = _inputs(*SHAPES[1])
    with pytest.raises(ValueError, match=r"q \(3, 24, 4, 8\), k \(3, 7, 4, 8\), v \(3, 6, 4, 8\)"):
        dot_product_attention(q, k, v[:, :6])
    with pytest.raises(ValueError, match="causal attention needs T == S"):
        dot_product_attention(q, k, v, is_causal=True)


# ---- implementations selected by model.attention ----

# (B, T, S, N, H, causal): self-attention, cross-attention to the 77 text tokens, temporal attention over 16 frames,
# the text encoder's causal attention. Head size 64 as the model's.
IMPL_SHAPES = {
    "self64": (2, 64, 64, 2, 64, False),
    "cross77": (2, 40, 77, 2, 64, False),
    "temporal16": (3, 16, 16, 2, 64, False),
    "causal77": (2, 77, 77, 2, 64, True),
}


def reference(q, k, v, is_causal=False):
    """softmax(Q Kᵀ / sqrt(H)) V, written out at full float32 precision."""
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("btnh,bsnh->bnts", q, k, precision=hi) / np.sqrt(q.shape[-1])
    if is_causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v, precision=hi)


def _values_and_grads(impl, q, k, v, w, causal):
    loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, causal, impl).astype(jnp.float32) * w)
    with A.splash_interpret():
        return jax.jit(lambda q, k, v: (dot_product_attention(q, k, v, causal, impl),
                                        jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("name", list(IMPL_SHAPES))
def test_values_and_gradients_match_reference(impl, name):
    b, t, s, n, h, causal = IMPL_SHAPES[name]
    q, k, v, w = _inputs(b, t, s, n, h)
    out, grads = _values_and_grads(impl, q, k, v, w, causal)
    ref_grads = jax.grad(lambda *a: jnp.sum(reference(*a, causal) * w), argnums=(0, 1, 2))(q, k, v)
    _close(out, reference(q, k, v, causal))
    for ours, ref, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
        try:
            _close(ours, ref)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_bfloat16_in_bfloat16_out(impl):
    b, t, s, n, h, causal = IMPL_SHAPES["cross77"]
    q, k, v, w = _inputs(b, t, s, n, h, dtype=jnp.bfloat16)
    out, grads = _values_and_grads(impl, q, k, v, w, causal)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _close(out, reference(*f32), rel=2e-2)


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_nothing_of_size_bnts_is_kept_for_the_backward(impl):
    b, t, s, n, h, causal = 2, 512, 512, 2, 64, False  # traced only: (B, N, T, S) is 8x the size of q
    q, k, v = (jax.ShapeDtypeStruct((b, x, n, h), jnp.float32) for x in (t, s, s))
    with A.splash_interpret():
        res = jax.eval_shape(lambda *a: jax.vjp(lambda *x: dot_product_attention(*x, causal, impl), *a)[1], q, k, v)
    sizes = [x.size for x in jax.tree.leaves(res) if hasattr(x, "size")]
    assert sizes and max(sizes) < b * n * t * s, sizes
    # ... while the closed form keeps its probabilities
    res = jax.eval_shape(lambda *a: jax.vjp(lambda *x: dot_product_attention(*x, causal, "closed_form"), *a)[1],
                         q, k, v)
    assert b * n * t * s in [x.size for x in jax.tree.leaves(res) if hasattr(x, "size")]


def test_splash_sharded_over_a_mesh_matches_reference():
    """Batch over data x fsdp and heads over tensor (8 fake CPU devices), inside a jitted program."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py fakes 8 CPU devices)")
    from dreamvideo_jax.parallel.mesh import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    q, k, v, w = _inputs(4, 24, 77, 2, 64, seed=3)
    spec = A._mesh_specs(mesh, 4, 2)
    assert spec == P(("data", "fsdp"), None, "tensor", None)
    with jax.set_mesh(mesh):
        out, grads = _values_and_grads("splash", q, k, v, w, False)
    ref_grads = jax.grad(lambda *a: jnp.sum(reference(*a) * w), argnums=(0, 1, 2))(q, k, v)
    _close(out, reference(q, k, v))
    for ours, ref in zip(grads, ref_grads):
        _close(ours, ref)


def test_mesh_specs_leave_out_axes_that_do_not_divide():
    from dreamvideo_jax.parallel.mesh import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    assert A._mesh_specs(mesh, 2, 5) == P("data", None, None, None)
    assert A._mesh_specs(mesh, 3, 4) == P(None, None, "tensor", None)


def _tpu_rule(x):
    bf16 = jnp.bfloat16
    assert A.resolve("auto", x(1024, bf16), x(1024, bf16)) == "splash"  # spatial self-attention
    assert A.resolve("auto", x(4096), x(4096)) == "splash"
    assert A.resolve("auto", x(16384), x(77)) == "xla"  # cross-attention to the text
    assert A.resolve("auto", x(16), x(16)) == "xla"  # temporal attention
    assert A.resolve("auto", x(77, n=16), x(77, n=16), True) == "xla"  # text encoder
    assert A.resolve("auto", x(1024, n=1, h=512), x(1024, n=1, h=512)) == "splash"  # the VAE's one 512-wide head
    assert A.resolve("auto", x(1024, h=8), x(1024, h=8)) == "xla"  # head sizes that are not multiples of 64


def test_auto_rule_by_platform(monkeypatch):
    f32, bf16 = jnp.float32, jnp.bfloat16
    x = lambda t, dtype=f32, n=5, h=64: jax.ShapeDtypeStruct((2, t, n, h), dtype)
    from dreamvideo_jax.parallel.mesh import make_mesh

    assert A.resolve("auto", x(1024), x(1024)) == "closed_form"  # this CPU
    monkeypatch.setattr(A, "platform", lambda: "tpu")
    # A program for several devices with no context mesh: XLA could not partition the kernel.
    assert jax.device_count() > 1 and A.resolve("auto", x(1024, bf16), x(1024, bf16)) == "xla"
    with jax.set_mesh(make_mesh({"data": 1}, jax.devices()[:1])):
        _tpu_rule(x)
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])):
        _tpu_rule(x)
    monkeypatch.setattr(A, "platform", lambda: "gpu")
    assert A.resolve("auto", x(1024, bf16), x(1024, bf16)) == "cudnn"
    assert A.resolve("auto", x(1024), x(1024)) == "xla"  # cuDNN's flash attention has no float32
    assert A.resolve("xla", x(1024, bf16), x(1024, bf16)) == "xla"


def test_bad_implementation_is_a_one_line_error_naming_the_key():
    q, k, v, _ = _inputs(1, 4, 4, 1, 8)
    with pytest.raises(ValueError) as e:
        dot_product_attention(q, k, v, implementation="flash")
    msg = str(e.value)
    assert "\n" not in msg and "model.attention='flash'" in msg
    for name in A.IMPLEMENTATIONS:
        assert repr(name) in msg


def test_bad_model_attention_in_config_is_a_one_line_error():
    from dreamvideo_jax.models import build

    m = _tiny_config().model
    m.attention = "flash"
    for fn in (build.build_dreamvideo, build.build_text_encoder, build.check_model_config):
        with pytest.raises(ValueError, match=r"^model\.attention='flash'; use one of \('auto', 'closed_form'") as e:
            fn(m)
        assert "\n" not in str(e.value)


def test_platform_errors_name_the_platform():
    q, k, v, _ = _inputs(1, 4, 4, 1, 8)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"model.attention='cudnn' needs a GPU; this program is built for 'cpu'"):
            dot_product_attention(q, k, v, implementation="cudnn")
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match=r"model.attention='splash' needs a TPU; this program is built for"):
            dot_product_attention(q, k, v, implementation="splash")


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="'cudnn' needs a GPU (cuDNN flash attention); none is present")
def test_cudnn_matches_reference():
    b, t, s, n, h, causal = IMPL_SHAPES["causal77"]
    q, k, v, w = _inputs(b, t, s, n, h, dtype=jnp.bfloat16)
    out, grads = _values_and_grads("cudnn", q, k, v, w, causal)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _close(out, reference(*f32, causal), rel=2e-2)
    ref_grads = jax.grad(lambda *a: jnp.sum(reference(*a, causal) * w), argnums=(0, 1, 2))(*f32)
    for ours, ref in zip(grads, ref_grads):
        _close(ours, ref, rel=5e-2)


def _tiny_config():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return runpy.run_path(os.path.join(root, "configs", "tiny.py"))["get_config"]()


@pytest.fixture(scope="module")
def tiny_unet(fast_compile):
    """The tiny config's U-Net (spatial, cross and temporal attention, transformer_in) with random parameters (the
    zero-initialised output projections too, so that temporal attention reaches the output), and its 'closed_form'
    output."""
    from dreamvideo_jax.models import build
    from dreamvideo_jax.parallel.sharding import unbox

    m = _tiny_config().model
    shapes = build.dummy_inputs(m, batch=1, frames=4)
    key = jax.random.split(jax.random.key(0), 2)
    inputs = (jax.random.normal(key[0], shapes["latents"].shape), jnp.array([500]),
              jax.random.normal(key[1], shapes["context"].shape))
    unet = build.build_unet(m)
    # Random parameters without compiling the init program: unit norm scales, fan-in scaled kernels, small biases.
    rng = np.random.default_rng(0)

    def value(path, x):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.ones(x.shape, np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return noise * 0.1 if x.ndim == 1 else noise / np.sqrt(np.prod(x.shape[:-1]))

    params = jax.tree_util.tree_map_with_path(value, unbox(build.abstract_variables(unet, *inputs)))
    assert unet.attention == "auto" and A.resolve("auto", inputs[0], inputs[0]) == "closed_form"
    return m, params, inputs, jax.jit(unet.apply)(params, *inputs)


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_tiny_unet_output_matches_closed_form(tiny_unet, impl):
    from dreamvideo_jax.models import build

    m, params, inputs, ref = tiny_unet
    m = m.copy_and_resolve_references()
    m.attention = impl
    with A.splash_interpret():
        out = jax.jit(build.build_unet(m).apply)(params, *inputs)
    _close(out, ref)


def test_system_key_and_architecture():
    """model.attention changes the compiled programs (System.key) but not the parameters (architecture hash)."""
    from dreamvideo_jax import system

    a, b = _tiny_config(), _tiny_config()
    b.model.attention = "xla"
    assert system.architecture_hash(a) == system.architecture_hash(b)
    assert system.System(a).key != system.System(b).key
