"""Checkpoint files and folders: shards, precision variants, bfloat16, legacy names, pickles, bad inputs.

Each bad input must fail with an error that names the problem (file, key, config value).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from dreamvideo_jax.convert import (CheckpointError, ConversionError, convert_component, load_component,  # noqa: E402
                                    open_weights)
from dreamvideo_jax.convert.configs import (text_config_from_transformers, unet_config_from_diffusers,  # noqa: E402
                                            vae_config_from_diffusers)


def _clip(vocab=64, layers=2):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=8,
                                      hidden_act="gelu", bos_token_id=62, eos_token_id=63, pad_token_id=63)
    return transformers.CLIPTextModel(cfg).eval()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    model = _clip()
    model.save_pretrained(d)
    return str(d), model


def _ref_params(model):
    return {k.removeprefix("text_model."): v.detach().float().numpy() for k, v in model.state_dict().items()}


def _ids():
    return np.array([[0, 5, 9, 63, 2, 2, 2, 2]])


def _run(module, variables):
    return np.asarray(jax.jit(module.apply)(variables, _ids()))


def _ref_out(model, dtype=torch.float32):
    with torch.no_grad():
        return model.to(dtype).float()(torch.from_numpy(_ids())).last_hidden_state.numpy()


def _copy(src, dst, skip=()):
    os.makedirs(dst, exist_ok=True)
    for n in os.listdir(src):
        if n not in skip:
            shutil.copy(os.path.join(src, n), os.path.join(dst, n))
    return str(dst)


def test_plain_folder_loads_and_matches(clip_dir):
    path, model = clip_dir
    module, variables = load_component(path)
    assert module.config.num_layers == 2 and module.config.output_layer == 2 and module.config.act == "gelu"
    got = _run(module, variables)
    ref = _ref_out(model)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5


def test_sharded_fp16_and_bf16(tmp_path):
    model = _clip()
    ref = _ref_params(model)
    # Shards written by transformers itself, with their index.
    model.save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
    names = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    c = convert_component(str(tmp_path / "sharded"))
    assert c.source.endswith("model.safetensors.index.json")
    module, variables = c.module, c.variables
    base = _run(module, variables)

    # A half-precision variant beside nothing else is picked up; values are the fp16-rounded ones, as float32.
    half = tmp_path / "fp16"
    half.mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", half)
    safetensors_numpy.save_file({f"text_model.{k}": v.astype(np.float16) for k, v in ref.items()},
                                str(half / "model.fp16.safetensors"))
    c16 = convert_component(str(half))
    assert c16.source.endswith("model.fp16.safetensors") and set(c16.source_dtypes) == {"F16"}
    emb = np.asarray(c16.variables["params"]["embeddings"]["token_embedding"]["embedding"])
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, ref["embeddings.token_embedding.weight"].astype(np.float16).astype(np.float32))

    # bfloat16 (numpy has no bf16: read from raw bytes), saved by torch.
    bf = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(bf)
    cbf = convert_component(str(bf))
    assert set(cbf.source_dtypes) == {"BF16"}
    want = torch.from_numpy(ref["encoder.layers.1.mlp.fc1.weight"]).bfloat16().float().numpy().T
    np.testing.assert_array_equal(np.asarray(cbf.variables["params"]["encoder"]["layers_1"]["mlp"]["fc1"]["kernel"]),
                                  want)
    assert np.abs(_run(cbf.module, cbf.variables) - base).max() < 0.1 * np.abs(base).max()

    # Both precisions present: full precision is the default, the variant on request.
    _copy(half, tmp_path / "sharded")
    assert convert_component(str(tmp_path / "sharded")).source.endswith("index.json")
    assert convert_component(str(tmp_path / "sharded"), variant="fp16").source.endswith("model.fp16.safetensors")
    with pytest.raises(FileNotFoundError, match="no 'bf16' weights"):
        convert_component(str(tmp_path / "sharded"), variant="bf16")


def test_missing_shard_and_index_mismatch(tmp_path):
    model = _clip()
    model.save_pretrained(tmp_path / "s", max_shard_size="8KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    d = _copy(tmp_path / "s", tmp_path / "missing", skip=(shard,))
    with pytest.raises(CheckpointError, match=f"shard file.*missing.*{shard}"):
        load_component(d)
    index["weight_map"]["text_model.ghost.weight"] = shard
    d = _copy(tmp_path / "s", tmp_path / "ghost")
    (tmp_path / "ghost" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        load_component(d)


def test_missing_folder_config_and_weights(clip_dir, tmp_path):
    path, _ = clip_dir
    with pytest.raises(FileNotFoundError, match="no such"):
        load_component(str(tmp_path / "nowhere"))
    d = _copy(path, tmp_path / "noconfig", skip=("config.json",))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_component(d)
    d = _copy(path, tmp_path / "noweights", skip=("model.safetensors",))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_component(d)


def test_truncated_and_garbage_safetensors(clip_dir, tmp_path):
    path, _ = clip_dir
    d = _copy(path, tmp_path / "trunc")
    f = os.path.join(d, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_component(d)
    open(f, "wb").write(data[:20])
    with pytest.raises(CheckpointError, match="not a safetensors file or truncated"):
        load_component(d)
    open(f, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load_component(d)


def test_wrong_shape_extra_and_missing_keys(clip_dir, tmp_path):
    path, model = clip_dir
    # transformers < 5 saved CLIPTextModel keys with a `text_model.` prefix (as the ms-1.7b snapshot has them)
    bad = {f"text_model.{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    bad["text_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((31, 16), np.float32)
    bad["text_model.encoder.extra.weight"] = np.zeros((3,), np.float32)
    del bad["text_model.final_layer_norm.bias"]
    d = _copy(path, tmp_path / "bad", skip=("model.safetensors",))
    safetensors_numpy.save_file(bad, os.path.join(d, "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        load_component(d)
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "shape mismatch" in msg and "text_model.encoder.layers.0.mlp.fc1.weight: source (31, 16)" in msg
    assert "unexpected" in msg and "text_model.encoder.extra.weight" in msg
    assert "missing" in msg and "final_layer_norm/bias" in msg


def test_pickle_refused_with_instructions_or_read_on_request(clip_dir, tmp_path):
    path, model = clip_dir
    d = _copy(path, tmp_path / "pickle", skip=("model.safetensors",))
    torch.save(model.state_dict(), os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(CheckpointError) as e:
        load_component(d)
    msg = str(e.value)
    assert "pytorch_model.bin is a pickle" in msg and "save_file" in msg and "weights_only=True" in msg
    assert "allow_pickle" in msg
    module, variables = load_component(d, allow_pickle=True)
    ref = _ref_out(model)
    assert np.abs(_run(module, variables) - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5
    single = tmp_path / "model.pth"
    torch.save(model.state_dict(), single)
    with pytest.raises(CheckpointError, match="model.pth is a pickle"):
        open_weights(str(single))


def test_text_projection_and_position_ids_ignored_output_layer(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                      num_attention_heads=2, max_position_embeddings=8, projection_dim=8,
                                      bos_token_id=62, eos_token_id=63, pad_token_id=63)
    model = transformers.CLIPTextModelWithProjection(cfg).eval()
    model.save_pretrained(tmp_path)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = np.arange(8)[None]  # as older transformers saved it
    os.remove(tmp_path / "model.safetensors")
    safetensors_numpy.save_file(state, str(tmp_path / "model.safetensors"))
    c = convert_component(str(tmp_path), output_layer=2)
    assert c.config.act == "quick_gelu" and c.config.layers_run == 2
    assert "text_projection.weight" in c.ignored and "text_model.embeddings.position_ids" in c.ignored
    assert any(k.startswith("text_model.encoder.layers.2.") for k in c.ignored)
    with torch.no_grad():
        out = model.text_model(torch.from_numpy(_ids()), output_hidden_states=True)
        ref = model.text_model.final_layer_norm(out.hidden_states[2]).numpy()
    got = _run(c.module, c.variables)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5


def test_vae_legacy_attention_names(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4).eval()
    vae.save_pretrained(tmp_path / "new")
    old = {}
    for k, v in vae.state_dict().items():
        for new_name, old_name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        # some old checkpoints store the attention projections as 1x1 convs
        old[k] = v.numpy()[:, :, None, None] if ".query.weight" in k else v.numpy()
    assert any(".proj_attn." in k for k in old)
    d = _copy(tmp_path / "new", tmp_path / "old", skip=("diffusion_pytorch_model.safetensors",))
    safetensors_numpy.save_file(old, os.path.join(d, "diffusion_pytorch_model.safetensors"))
    _, new_vars = load_component(str(tmp_path / "new"))
    _, old_vars = load_component(d)
    jax.tree.map(np.testing.assert_array_equal, new_vars, old_vars)


def test_config_values_refused_by_name():
    with pytest.raises(CheckpointError, match="norm_num_groups=None"):
        unet_config_from_diffusers({"_class_name": "UNet3DConditionModel", "norm_num_groups": None})
    with pytest.raises(CheckpointError, match="unknown down block type 'SpatialDownBlock'"):
        unet_config_from_diffusers({"down_block_types": ["SpatialDownBlock"] * 4})
    with pytest.raises(CheckpointError, match="act_fn='gelu'"):
        unet_config_from_diffusers({"act_fn": "gelu"})
    with pytest.raises(CheckpointError, match="unknown UNet3DConditionModel config key"):
        unet_config_from_diffusers({"addition_embed_type": "text"})
    with pytest.raises(CheckpointError, match="per-block attention_head_dim"):
        unet_config_from_diffusers({"attention_head_dim": [8, 16, 16, 16]})
    with pytest.raises(CheckpointError, match="UpDecoderBlock2D"):
        vae_config_from_diffusers({"block_out_channels": [8], "up_block_types": ["UpDecoderBlockFancy"]})
    with pytest.raises(CheckpointError, match="latents_mean"):
        vae_config_from_diffusers({"latents_mean": [0.1] * 4})
    with pytest.raises(CheckpointError, match="intermediate_size 40 is not a multiple of hidden_size 16"):
        text_config_from_transformers({"hidden_size": 16, "intermediate_size": 40, "num_attention_heads": 2})
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        text_config_from_transformers({"hidden_act": "relu"})
    # Defaults are the libraries' own, and ms-1.7b's unet config is the UNetConfig default.
    assert unet_config_from_diffusers({"_class_name": "UNet3DConditionModel", "_diffusers_version": "0.19.0",
                                       "sample_size": 32}) == unet_config_from_diffusers({})
    assert vae_config_from_diffusers({}).block_out_channels == (64,)
    assert text_config_from_transformers({}).act == "quick_gelu"


def test_kind_mismatch_and_unsupported_class(clip_dir, tmp_path):
    path, _ = clip_dir
    with pytest.raises(CheckpointError, match="describes a text_encoder, but a unet was asked for"):
        load_component(path, kind="unet")
    d = _copy(path, tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="unsupported component 'UNet2DConditionModel'"):
        load_component(d)


def test_index_entries_leading_out_of_the_folder_are_refused(tmp_path):
    """weight_map values that are absolute or climb out with '..' are refused naming the index and the entry,
    before any file they name is opened."""
    model = _clip()
    model.save_pretrained(tmp_path / "s", max_shard_size="8KB")
    index_path = tmp_path / "s" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    shutil.copy(tmp_path / "s" / shard, tmp_path / shard)  # a real shard, outside the component folder
    key = next(k for k, v in index["weight_map"].items() if v == shard)
    for i, bad in enumerate((f"../{shard}", str(tmp_path / shard), "/etc/passwd", f"sub/../../{shard}")):
        d = _copy(tmp_path / "s", tmp_path / f"bad{i}")
        index["weight_map"][key] = bad
        (tmp_path / f"bad{i}" / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError) as e:
            load_component(d)
        msg = str(e.value)
        assert msg.startswith(os.path.join(d, "model.safetensors.index.json") + ": ") and "\n" not in msg
        assert f"weight_map entry {key!r}: {bad!r}" in msg and "no absolute path, no '..'" in msg
