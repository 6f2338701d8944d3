"""U-Net key layouts: original ModelScope-T2V checkpoints, and the full-size ms-1.7b key set.

The ModelScope layout is produced here by renaming a diffusers state dict INTO it, following the structure of
ModelScope's `UNetSD` (input_blocks / middle_block / output_blocks, `temopral_conv`, Conv1d temporal
projections) -- written independently of the converter's own mapping, which must undo it exactly.
"""

import os
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from dreamvideo_jax.convert import convert_component, load_component, plan_conversion, target_shapes  # noqa: E402
from dreamvideo_jax.convert.keys import modelscope_unet_key  # noqa: E402
from dreamvideo_jax.convert.torch_to_flax import ConversionError  # noqa: E402
from dreamvideo_jax.models.unet3d import UNet3D, UNetConfig  # noqa: E402

CROSS, PLAIN = "CrossAttnDownBlock3D", "DownBlock3D"
TINY = dict(block_out_channels=(8, 16, 16), down_block_types=(CROSS, CROSS, PLAIN),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"), layers_per_block=2,
            norm_num_groups=4, cross_attention_dim=16, attention_head_dim=8)

_RESNET_TO_MS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_modelscope(state: dict, layers_per_block: int, up_types, prefix="model.diffusion_model.") -> dict:
    """diffusers UNet3DConditionModel state dict -> ModelScope UNetSD state dict."""
    per = layers_per_block + 1
    out = {}
    for key, value in state.items():
        k = key
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|temp_convs|attentions|temp_attentions)\.(\d+)\.(.*)", k)
        if k.startswith("conv_in."):
            k = "input_blocks.0.0." + k[len("conv_in."):]
        elif k.startswith("transformer_in."):
            k = "input_blocks.0.1." + k[len("transformer_in."):]
        elif k.startswith("time_embedding.linear_"):
            k = f"time_embed.{0 if k[22] == '1' else 2}.{k[24:]}"
        elif k.startswith("conv_norm_out."):
            k = "out.0." + k[len("conv_norm_out."):]
        elif k.startswith("conv_out."):
            k = "out.2." + k[len("conv_out."):]
        elif m:
            side, b, kind, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            idx = 1 + b * per + layer if side == "down" else b * per + layer
            group = "input_blocks" if side == "down" else "output_blocks"
            if kind == "resnets":
                name, _, tail = rest.partition(".")
                k = f"{group}.{idx}.0.{_RESNET_TO_MS[name]}.{tail}"
            elif kind == "temp_convs":
                k = f"{group}.{idx}.0.temopral_conv.{rest}"
            else:
                k = f"{group}.{idx}.{1 if kind == 'attentions' else 2}.{rest}"
        elif re.match(r"down_blocks\.\d+\.downsamplers\.0\.conv\.", k):
            b = int(k.split(".")[1])
            k = f"input_blocks.{1 + b * per + layers_per_block}.op.{k.split('.')[-1]}"
        elif re.match(r"up_blocks\.\d+\.upsamplers\.0\.conv\.", k):
            b = int(k.split(".")[1])
            sub = 3 if up_types[b] == "CrossAttnUpBlock3D" else 1  # after the spatial + temporal transformer
            k = f"output_blocks.{b * per + layers_per_block}.{sub}.conv.{k.split('.')[-1]}"
        elif k.startswith("mid_block."):
            k = (k.replace("mid_block.resnets.0.", "middle_block.0.").replace("mid_block.resnets.1.", "middle_block.3.")
                 .replace("mid_block.temp_convs.0.", "middle_block.0.temopral_conv.")
                 .replace("mid_block.temp_convs.1.", "middle_block.3.temopral_conv.")
                 .replace("mid_block.attentions.0.", "middle_block.1.")
                 .replace("mid_block.temp_attentions.0.", "middle_block.2."))
            for new, old in _RESNET_TO_MS.items():
                k = re.sub(rf"^(middle_block\.[03]\.){new}\.", rf"\g<1>{old}.", k)
        else:
            raise AssertionError(f"test mapping does not cover {key}")
        temporal = k.startswith("input_blocks.0.1.") or re.match(r"(input_blocks|output_blocks|middle_block)\.\d+\.2\.", k)
        if temporal and re.search(r"\.proj_(in|out)\.weight$", k):
            value = value[..., None]  # ModelScope's temporal transformer projects with Conv1d(k=1)
        assert prefix + k not in out, k
        out[prefix + k] = value
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.UNet3DConditionModel(**TINY)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():  # zero-initialised layers too
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    d = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(d)
    return str(d), ref.eval()


def test_modelscope_layout_converts_to_the_same_params(tiny, tmp_path):
    folder, ref = tiny
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ms = to_modelscope(state, TINY["layers_per_block"], TINY["up_block_types"])
    assert any(".temopral_conv." in k for k in ms) and any(k.endswith(".op.weight") for k in ms)
    assert any(re.search(r"output_blocks\.\d+\.3\.conv\.weight", k) for k in ms)  # upsampler after attentions
    assert any(re.search(r"output_blocks\.\d+\.1\.conv\.weight", k) for k in ms)  # upsampler of the plain block
    path = str(tmp_path / "text2video_pytorch_model.safetensors")
    safetensors_numpy.save_file(ms, path)

    _, want = load_component(folder)
    c = convert_component(path, config=os.path.join(folder, "config.json"))
    assert c.kind == "unet" and c.layout == "modelscope"
    jax.tree.map(np.testing.assert_array_equal, want, c.variables)

    # Same through the diffusers key names directly, and without the `model.diffusion_model.` prefix.
    no_prefix = {k.removeprefix("model.diffusion_model."): v for k, v in ms.items()}
    renamed = {modelscope_unet_key(k, TINY["layers_per_block"]): k for k in no_prefix}
    assert set(renamed) == set(state)


def test_modelscope_layout_names_leftover_keys(tiny, tmp_path):
    folder, ref = tiny
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    ms = to_modelscope(state, TINY["layers_per_block"], TINY["up_block_types"])
    ms["model.diffusion_model.fps_embedding.0.weight"] = np.zeros((4, 4), np.float32)
    del ms["model.diffusion_model.input_blocks.1.0.temopral_conv.conv4.3.bias"]
    path = str(tmp_path / "ms.safetensors")
    safetensors_numpy.save_file(ms, path)
    with pytest.raises(ConversionError) as e:
        load_component(path, config=os.path.join(folder, "config.json"))
    msg = str(e.value)
    assert "model.diffusion_model.fps_embedding.0.weight" in msg
    assert "down_blocks_0/temp_convs_0/conv4_3/bias" in msg
    # Built with the default (ms-1.7b) architecture, the tiny weights are refused by shape, naming keys.
    with pytest.raises(ConversionError, match=r"input_blocks\.0\.0\.weight \(as conv_in\.weight\)"):
        load_component(path)


@pytest.fixture(scope="module")
def full_size():
    import torch  # noqa: F811

    with torch.device("meta"):
        ref = diffusers.UNet3DConditionModel()  # = text-to-video-ms-1.7b
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    return shapes, target_shapes(UNet3D(UNetConfig()))


def test_full_size_diffusers_keys_all_mapped(full_size):
    shapes, target = full_size
    plan = plan_conversion(shapes, target, what="UNet3DConditionModel()")
    assert len(plan) == len(shapes) == len(jax.tree.leaves(target)) == 1480
    n = sum(int(np.prod(s)) for s in shapes.values())
    assert 1.3e9 < n < 1.5e9  # ~1.41B parameters


def test_full_size_modelscope_keys_all_mapped(full_size):
    shapes, target = full_size
    cfg = UNetConfig()
    ms = to_modelscope({k: _Shape(s) for k, s in shapes.items()},
                       cfg.layers_per_block, cfg.up_block_types)
    src = {modelscope_unet_key(k, cfg.layers_per_block): v.shape for k, v in ms.items()}
    assert None not in src
    assert "input_blocks.0.1.proj_in.weight" in {k.removeprefix("model.diffusion_model.") for k in ms}
    assert len(plan_conversion(src, target, what="ModelScope UNetSD")) == 1480


class _Shape:
    """A stand-in tensor with only a shape (adding a trailing axis like `value[..., None]`)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def __getitem__(self, idx):
        assert idx == (Ellipsis, None)
        return _Shape(self.shape + (1,))
