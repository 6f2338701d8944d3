"""C3D-UCF101 (video IS classifier): architecture shapes, weight-file loading, parity with a PyTorch reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dreamvideo_jax.convert.torch_to_flax import ConversionError
from dreamvideo_jax.evaluation.c3d import (
    CONV_NAMES,
    C3D,
    C3DClassifier,
    C3DConfig,
    load_c3d_params,
    video_inception_score,
)

TINY = C3DConfig(widths=(4, 8, 8, 8, 16, 16, 16, 16), fc=32)


def test_full_size_architecture_matches_tgan2_c3d():
    shapes = jax.eval_shape(lambda: C3D().init(jax.random.key(0), jnp.zeros((1, 16, 112, 112, 3))))["params"]
    assert shapes["conv1a"]["kernel"].shape == (3, 3, 3, 3, 64)
    assert shapes["conv5b"]["kernel"].shape == (3, 3, 3, 512, 512)
    assert shapes["fc6"]["kernel"].shape == (512 * 1 * 4 * 4, 4096)  # 7x7 pooled with cover_all -> 4x4
    assert shapes["fc8"]["kernel"].shape == (4096, 101)
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n == 78_409_573  # TGAN2's C3DVersion1UCF101
    out = jax.eval_shape(lambda p, x: C3D().apply({"params": p}, x, return_features=True), shapes,
                         jax.ShapeDtypeStruct((2, 16, 112, 112, 3), jnp.float32))  # fmt: skip
    assert out[0].shape == (2, 101) and out[1].shape == (2, 4096)


def _torch_reference(cfg, seed=0):
    """TGAN2's C3DVersion1UCF101 forward in PyTorch (NCDHW), with random weights and mean clip."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(seed)
    ins = (3,) + cfg.widths[:-1]
    convs = nn.ModuleDict({n: nn.Conv3d(i, o, 3, padding=1) for n, i, o in zip(CONV_NAMES, ins, cfg.widths)})
    fcs = nn.ModuleDict({"fc6": nn.Linear(cfg.widths[-1] * 16, cfg.fc), "fc7": nn.Linear(cfg.fc, cfg.fc),
                         "fc8": nn.Linear(cfg.fc, cfg.num_classes)})  # fmt: skip
    mean = np.random.RandomState(seed).uniform(80, 120, (3, 16, 128, 171)).astype(np.float32)  # full mean clip

    def forward(video_uint8):  # (N, T, H, W, 3) uint8 RGB
        x = torch.from_numpy(video_uint8).float().permute(0, 4, 1, 2, 3) / 127.5 - 1.0  # (N, 3, T, H, W)
        n, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
        x = torch.nn.functional.interpolate(x, size=(112, 112), mode="bilinear", align_corners=True)
        x = x.reshape(n, t, c, 112, 112).permute(0, 2, 1, 3, 4)
        x = x.flip(1) * 128 + (128 - torch.from_numpy(mean[:, :, 8:120, 8:120]))
        relu, pool = torch.relu, nn.functional.max_pool3d
        x = pool(relu(convs["conv1a"](x)), (1, 2, 2))
        x = pool(relu(convs["conv2a"](x)), 2)
        x = pool(relu(convs["conv3b"](relu(convs["conv3a"](x)))), 2)
        x = pool(relu(convs["conv4b"](relu(convs["conv4a"](x)))), 2)
        x = pool(relu(convs["conv5b"](relu(convs["conv5a"](x)))), 2, ceil_mode=True)
        x = relu(fcs["fc6"](x.flatten(1)))
        return fcs["fc8"](relu(fcs["fc7"](x)))

    state = {f"{n}.{k}": v.detach().numpy() for n, m in {**convs, **fcs}.items() for k, v in m.state_dict().items()}
    return forward, state, mean


def test_loaded_weights_match_pytorch_reference(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    forward, state, mean = _torch_reference(TINY)
    npz = str(tmp_path / "c3d_ucf101.npz")  # TGAN2's Chainer names (conv1a/W, conv1a/b, ...) + the full mean clip
    np.savez(npz, mean=mean, **{k.replace(".weight", "/W").replace(".bias", "/b"): v for k, v in state.items()})
    st = str(tmp_path / "c3d_ucf101.safetensors")  # PyTorch names + the 112x112 mean crop
    save_file({**state, "mean": mean[:, :, 8:120, 8:120].copy()}, st)
    from_npz, from_st = load_c3d_params(npz, TINY), load_c3d_params(st, TINY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_npz, from_st)

    clf = C3DClassifier(from_st, TINY, batch_size=2)  # 3 clips: one full batch and one partial
    videos = np.random.RandomState(1).randint(0, 256, (3, 16, 64, 80, 3)).astype(np.uint8)
    ours = clf(videos)
    with torch.no_grad():
        ref = forward(videos).numpy()
    assert ours.shape == (3, 101)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max() + 1e-5)
    mean_is, _ = video_inception_score(None, clf, num_splits=1, logits=ours)
    assert 1.0 <= mean_is <= 3.0 + 1e-9  # at most the number of samples in the split


def test_loader_names_every_problem(tmp_path):
    _, state, mean = _torch_reference(TINY)
    path = str(tmp_path / "bad.npz")
    np.savez(path, **state)
    with pytest.raises(ValueError, match="mean"):
        load_c3d_params(path, TINY)
    bad = dict(state, mean=mean)
    del bad["fc8.bias"]
    bad["conv2a.weight"] = bad["conv2a.weight"][:, :3]
    np.savez(path, **bad)
    with pytest.raises(ConversionError) as e:
        load_c3d_params(path, TINY)
    assert "fc8/bias" in str(e.value) and "conv2a.weight" in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_c3d_params(str(tmp_path / "missing.npz"))
