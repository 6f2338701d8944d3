"""End to end: a tiny diffusers text-to-video snapshot -> `python -m dreamvideo_jax.convert` -> base checkpoint.

The snapshot is written with diffusers/transformers `save_pretrained` (plus CLIP tokenizer files built from
open_clip's BPE vocabulary) where README.md's convert command reads it, and that command, as printed, writes the
base checkpoint every test here reads (tests/test_readme.py counts the command as run here); the converted
components, rebuilt from the written `model_config.json`, must match the PyTorch models on the same inputs within
max|diff| <= 1e-4 * max|ref| + 1e-5 (float32).
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from dreamvideo_jax.convert import load_component, load_tokenizer  # noqa: E402
from dreamvideo_jax.convert.__main__ import main  # noqa: E402
from dreamvideo_jax.data.tokenizer import tokenize, write_tokenizer_files  # noqa: E402
from dreamvideo_jax.models import build  # noqa: E402
from readme_commands import Sandbox, find  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CROSS = "CrossAttnDownBlock3D"
UNET = dict(block_out_channels=(16, 32), down_block_types=(CROSS, "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=32, attention_head_dim=8)
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4)
PROMPTS = ["a red panda climbing a tree, slow motion", "Astronaut riding a horse!! 4K  (HDR)", ""]


def _close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err, tol = np.abs(ours - ref).max(), 1e-4 * np.abs(ref).max() + 1e-5
    assert err <= tol, f"max|diff| {err:.3g} > tol {tol:.3g}"


def _randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # zero-initialised layers become non-zero, so every path matters
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return Sandbox(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="module")
def snapshot(sandbox):
    root = sandbox.path(find("dreamvideo_jax.convert").flags["src"])
    torch.manual_seed(0)
    unet = _randomise(diffusers.UNet3DConditionModel(**UNET), 1)
    vae = _randomise(diffusers.AutoencoderKL(**VAE), 2)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu")).eval()
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.save_pretrained(root / "text_encoder")
    write_tokenizer_files(str(root / "tokenizer"))
    return str(root), dict(unet=unet, vae=vae, text_encoder=text)


@pytest.fixture(scope="module")
def converted(sandbox, snapshot):
    """README.md's convert command, in a subprocess: the snapshot in, a base checkpoint out."""
    command = find("dreamvideo_jax.convert")
    proc = sandbox.run(command, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert "wrote" in proc.stdout and "diffusers layout" in proc.stdout, proc.stdout
    return str(sandbox.path(command.flags["dst"]))


def test_cli_writes_base_checkpoint(snapshot, converted, capsys):
    from dreamvideo_jax.checkpoints import load_base

    src, _ = snapshot
    assert {"tokenizer", "conversion.json"} <= set(os.listdir(converted))
    report = json.load(open(os.path.join(converted, "conversion.json")))
    assert report["components"]["unet"]["layout"] == "diffusers"
    assert report["components"]["text_encoder"]["config"]["output_layer"] == 2
    params, model_config = load_base(converted)
    assert set(params) == {"unet", "text_encoder", "vae"}
    for name in ("unet", "vae", "text_encoder"):
        _, variables = load_component(os.path.join(src, name))
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params[name]), variables["params"])
    assert tuple(model_config.unet.block_out_channels) == UNET["block_out_channels"]
    assert tuple(model_config.vae.block_out_channels) == VAE["block_out_channels"]
    assert model_config.text.width == 32 and model_config.text.num_layers == 2
    build.check_model_config(model_config)
    # The full DreamVideo model builds from this config and its primary U-Net is exactly the converted one.
    dv = build.build_dreamvideo(model_config)
    shapes = nn.meta.unbox(build.abstract_variables(dv, **build.dummy_inputs(model_config)))
    assert jax.tree.map(lambda x: x.shape, shapes["params"]["unet"]) == jax.tree.map(np.shape, params["unet"])


def test_converted_components_match_torch(snapshot, converted):
    from dreamvideo_jax.checkpoints import load_base

    _, ref = snapshot
    params, m = load_base(converted)
    rng = np.random.RandomState(0)

    # Tokenizer copied into the output: ids equal transformers' on the source folder.
    tok = load_tokenizer(os.path.join(converted, "tokenizer"))
    ids = tokenize(tok, PROMPTS)
    want = transformers.CLIPTokenizer.from_pretrained(os.path.join(snapshot[0], "tokenizer"))(
        PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, np.array(want))
    assert ids[0, 0] == 49406 and len(tok) == 49408

    # Text encoder on the real token ids.
    enc = build.build_text_encoder(m)
    ctx = jax.jit(enc.apply)({"params": params["text_encoder"]}, ids)
    with torch.no_grad():
        ctx_ref = ref["text_encoder"](torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    _close(ctx, ctx_ref)

    # U-Net: odd frame count, H != W, channels-last video, conditioned on the encoded prompts.
    unet = build.build_unet(m)
    b, f, h, w = 3, 3, 12, 10
    x = rng.randn(b, f, h, w, 4).astype(np.float32)
    t = np.array([1, 500, 999])
    with torch.no_grad():
        out_ref = ref["unet"](torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(t),
                              torch.from_numpy(ctx_ref)).sample.permute(0, 2, 3, 4, 1).numpy()
    _close(jax.jit(unet.apply)({"params": params["unet"]}, x, t, ctx_ref), out_ref)

    # VAE: encode (mean) and decode, channels-last images.
    vae = build.build_autoencoder(m)
    img = rng.uniform(-1, 1, (2, 16, 12, 3)).astype(np.float32)
    with torch.no_grad():
        mean_ref = ref["vae"].encode(torch.from_numpy(img).permute(0, 3, 1, 2)).latent_dist.mean
        dec_ref = ref["vae"].decode(mean_ref).sample.permute(0, 2, 3, 1).numpy()
    v = {"params": params["vae"]}
    mean, _ = jax.jit(lambda v, a: vae.apply(v, a, method="encode"))(v, img)
    _close(mean, mean_ref.permute(0, 2, 3, 1).numpy())
    dec = jax.jit(lambda v, z: vae.apply(v, z, method="decode"))(v, np.asarray(mean) * vae.scaling_factor)
    _close(dec, dec_ref)


def test_cli_bad_inputs_exit_1_with_one_line(snapshot, converted, tmp_path, capsys):
    src, ref = snapshot

    def run(*argv):
        capsys.readouterr()
        rc = main(list(argv))
        err = capsys.readouterr().err.strip()
        assert rc == 1 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
        return err

    assert "not empty" in run(f"--src={src}", f"--dst={converted}") and "--overwrite" in run(
        f"--src={src}", f"--dst={converted}")
    assert "no such snapshot folder" in run(f"--src={tmp_path / 'nowhere'}", f"--dst={tmp_path / 'o1'}")
    assert "--unet" in run(f"--vae={src}/vae", f"--dst={tmp_path / 'o2'}")

    # A pickled U-Net is refused with how to convert it; nothing is left behind.
    bad = tmp_path / "pickled"
    os.makedirs(bad / "unet")
    for name in ("vae", "text_encoder", "tokenizer"):
        os.symlink(os.path.join(src, name), bad / name)
    os.symlink(os.path.join(src, "unet", "config.json"), bad / "unet" / "config.json")
    torch.save(ref["unet"].state_dict(), bad / "unet" / "diffusion_pytorch_model.bin")
    err = run(f"--src={bad}", f"--dst={tmp_path / 'o3'}")
    assert "diffusion_pytorch_model.bin is a pickle" in err and "--allow_pickle" in err
    # A truncated file, and a weight of the wrong shape, name the file / key.
    trunc = tmp_path / "trunc"
    os.makedirs(trunc / "unet")
    for name in ("vae", "text_encoder"):
        os.symlink(os.path.join(src, name), trunc / name)
    os.symlink(os.path.join(src, "unet", "config.json"), trunc / "unet" / "config.json")
    data = open(os.path.join(src, "unet", "diffusion_pytorch_model.safetensors"), "rb").read()
    open(trunc / "unet" / "diffusion_pytorch_model.safetensors", "wb").write(data[:-1000])
    assert "diffusion_pytorch_model.safetensors: truncated" in run(f"--src={trunc}", f"--dst={tmp_path / 'o4'}")
    assert "text_encoder" in run(f"--src={src}", f"--text_encoder={src}/unet", f"--dst={tmp_path / 'o5'}")
    assert not any(n.startswith(".o") for n in os.listdir(tmp_path)), os.listdir(tmp_path)
    assert not any(os.path.exists(tmp_path / f"o{i}") for i in range(1, 6))

    # --overwrite replaces the output.
    capsys.readouterr()
    assert main([f"--src={src}", f"--dst={converted}", "--overwrite"]) == 0
    assert "wrote" in capsys.readouterr().out


def test_cli_subprocess_components_given_separately(snapshot, converted, tmp_path):
    """As a user runs it: separate component paths, a single-file U-Net, no tokenizer (built from open_clip)."""
    from dreamvideo_jax.checkpoints import load_base

    src, _ = snapshot
    dst = tmp_path / "bf16"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "dreamvideo_jax.convert", f"--unet={src}/unet/diffusion_pytorch_model.safetensors",
         f"--vae={src}/vae", f"--text_encoder={src}/text_encoder", f"--dst={dst}", "--param_dtype=bfloat16"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout and "bfloat16" in proc.stdout and "open-clip-torch" in proc.stdout
    assert "unet" in proc.stdout and "params" in proc.stdout
    params, m = load_base(str(dst))
    assert m.param_dtype == "bfloat16"
    ref_params, _ = load_base(converted)
    leaf = lambda p: np.asarray(p["unet"]["conv_in"]["kernel"])
    assert leaf(params).dtype.name == "bfloat16"
    np.testing.assert_array_equal(leaf(params).astype(np.float32),
                                  leaf(ref_params).astype(jax.numpy.bfloat16).astype(np.float32))
    tok = load_tokenizer(str(dst / "tokenizer"))
    np.testing.assert_array_equal(tokenize(tok, PROMPTS), tokenize(load_tokenizer(f"{src}/tokenizer"), PROMPTS))


def test_dst_overlapping_an_input_is_refused(snapshot, tmp_path, capsys):
    """--dst equal to, above or inside the snapshot (or a component given separately) is refused before anything
    is read or written, even with --overwrite; the snapshot is left as it was."""
    src, _ = snapshot
    before = sorted(os.path.relpath(os.path.join(r, f), src) for r, _, fs in os.walk(src) for f in fs)

    def refused(*argv):
        capsys.readouterr()
        rc = main([*argv, "--overwrite"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: --dst=") and "\n" not in err, err
        return err

    parent = os.path.dirname(src)
    assert f"is the same folder as the input --src={src}" in refused(f"--src={src}", f"--dst={src}")
    assert f"--dst={parent}: contains the input --src={src}" in refused(f"--src={src}", f"--dst={parent}")
    assert "lies inside the input --src=" in refused(f"--src={src}", f"--dst={src}/unet")
    assert "lies inside the input --src=" in refused(f"--src={src}", f"--dst={src}/new_output")
    link = tmp_path / "link"
    os.symlink(src, link)  # the same folder under another name
    assert "is the same folder as the input --src=" in refused(f"--src={src}", f"--dst={link}")
    # Components given separately, and component folders found through --src.
    err = refused(f"--unet={src}/unet", f"--vae={src}/vae", f"--text_encoder={src}/text_encoder",
                  f"--dst={src}/vae")
    assert f"lies inside the input --vae={src}/vae" in err or f"is the same folder as the input --vae={src}/vae" in err
    elsewhere = tmp_path / "elsewhere"
    os.makedirs(elsewhere / "snap")
    os.symlink(os.path.join(src, "unet"), elsewhere / "snap" / "unet")
    for name in ("vae", "text_encoder"):
        os.symlink(os.path.join(src, name), elsewhere / "snap" / name)
    err = refused(f"--src={elsewhere / 'snap'}", f"--dst={src}")
    assert "contains the input unet folder" in err and "of --src" in err
    after = sorted(os.path.relpath(os.path.join(r, f), src) for r, _, fs in os.walk(src) for f in fs)
    assert after == before
