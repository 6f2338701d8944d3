"""C3D fine-tuned on UCF101: the classifier of the video Inception Score on UCF101.

Architecture and preprocessing follow TGAN2's ``c3d_ucf101`` (``C3DVersion1UCF101``, the C3D "deepnetA" Caffe
model fine-tuned on UCF101, as used by TGAN/TGAN2, StyleGAN-V's ``isv`` and MAGVIT): 16 frames at 112x112;
eight 3x3x3 convolutions (64, 128, 256, 256, 512, 512, 512, 512 channels) with ReLU; max pools (1,2,2) after
conv1a and (2,2,2) after conv2a, conv3b, conv4b and conv5b (the last one rounding up, Chainer's ``cover_all``,
so 7x7 becomes 4x4); fc6 8192 -> 4096, fc7 4096 -> 4096 (ReLU; dropout is off at inference), fc8 -> 101 logits.
The flattening before fc6 is channel-first, ``(C, T, H, W)``, as in Chainer/PyTorch.

Preprocessing (:func:`preprocess`): uint8 RGB -> ``x / 127.5 - 1`` -> bilinear resize to 112x112 with aligned
corners (Chainer's ``F.resize_images``) -> RGB to BGR -> ``x * 128 + 128 - mean``, where ``mean`` is the
per-pixel Sports-1M mean clip (BGR, 16x112x112, the ``[8:120, 8:120]`` crop of TGAN2's ``mean2.npz``). The mean
is part of the weights file.

Weights are not downloadable here: the user gives a file (:func:`load_c3d_params`), ``.npz`` or
``.safetensors``, holding

- ``conv{1a,2a,3a,3b,4a,4b,5a,5b}.weight`` ``(O, I, 3, 3, 3)`` and ``.bias`` ``(O,)``;
- ``fc{6,7,8}.weight`` ``(out, in)`` and ``.bias``;
- ``mean``: ``(3, 16, 112, 112)`` BGR on [0, 255], or the full ``(3, 16, H, W)`` mean clip (H, W >= 120), of which
  the ``[8:120, 8:120]`` crop is taken as TGAN2 does.

Chainer's names (``conv1a/W``, ``conv1a/b``, ...) are accepted as well, so TGAN2's files convert with::

    import numpy as np
    w = dict(np.load("conv3d_deepnetA_ucf.npz"))          # TGAN2's Chainer C3D-UCF101 weights
    w["mean"] = np.load("mean2.npz")["mean"]             # TGAN2's mean clip
    np.savez("c3d_ucf101.npz", **w)

A PyTorch port (e.g. StyleGAN-V's ``c3d_ucf101.pt``) converts by saving its ``state_dict()`` under the names
above plus the mean, e.g. ``safetensors.numpy.save_file({k: v.numpy() for k, v in sd.items()} | {"mean": m})``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dreamvideo_jax.evaluation.i3d import Conv3D

CONV_NAMES = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
FC_NAMES = ("fc6", "fc7", "fc8")


@dataclasses.dataclass(frozen=True)
class C3DConfig:
    widths: tuple[int, ...] = (64, 128, 256, 256, 512, 512, 512, 512)
    fc: int = 4096
    num_classes: int = 101
    frames: int = 16
    size: int = 112

    def __post_init__(self):
        if len(self.widths) != len(CONV_NAMES):
            raise ValueError(f"C3DConfig.widths needs {len(CONV_NAMES)} entries; got {self.widths}")
        if self.frames % 16 or self.size % 16:
            raise ValueError("C3DConfig: frames and size must be multiples of 16")


def _pool(x, window, ceil: bool = False):
    pads = [(0, 0)] * 3
    if ceil:  # Chainer cover_all / PyTorch ceil_mode: a partial window at the end is kept
        pads = [(0, (-n) % w) for n, w in zip(x.shape[1:4], window)]
    return nn.max_pool(x, window, window, padding=tuple(pads))


class C3D(nn.Module):
    """Preprocessed clips `(N, 16, 112, 112, 3)` (BGR, mean-subtracted; see :func:`preprocess`) -> logits `(N, 101)`.

    With `return_features=True`, returns `(logits, fc7 features)`.
    """

    config: C3DConfig = C3DConfig()

    @nn.compact
    def __call__(self, x, return_features: bool = False):
        c = self.config
        if x.shape[1:] != (c.frames, c.size, c.size, 3):
            raise ValueError(f"C3D takes (N, {c.frames}, {c.size}, {c.size}, 3) clips; got {x.shape}")
        conv = lambda i, h: nn.relu(Conv3D(c.widths[i], (3, 3, 3), use_bias=True, name=CONV_NAMES[i])(h))
        x = _pool(conv(0, x), (1, 2, 2))
        x = _pool(conv(1, x), (2, 2, 2))
        x = _pool(conv(3, conv(2, x)), (2, 2, 2))
        x = _pool(conv(5, conv(4, x)), (2, 2, 2))
        x = _pool(conv(7, conv(6, x)), (2, 2, 2), ceil=True)
        x = jnp.transpose(x, (0, 4, 1, 2, 3)).reshape(x.shape[0], -1)  # (C, T, H, W) order, as Chainer/PyTorch
        x = nn.relu(nn.Dense(c.fc, name="fc6")(x))
        feats = nn.relu(nn.Dense(c.fc, name="fc7")(x))
        logits = nn.Dense(c.num_classes, name="fc8")(feats)
        return (logits, feats) if return_features else logits


@functools.lru_cache(maxsize=64)
def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`(n_out, n_in)` bilinear weights with aligned corners (Chainer `resize_images`, PyTorch align_corners=True)."""
    src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m.astype(np.float32)


def preprocess(videos, mean, size: int = 112):
    """uint8 RGB `(N, T, H, W, 3)` -> C3D input: resized to `size`, BGR, `x * 128 + 128 - mean` (jit-able).

    `mean`: `(T, size, size, 3)` BGR mean clip (the `mean` parameter of :func:`load_c3d_params`).
    """
    _, _, h, w, _ = videos.shape
    x = videos.astype(jnp.float32) / 127.5 - 1.0
    if (h, w) != (size, size):
        x = jnp.einsum("oh,nthwc->ntowc", jnp.asarray(align_corners_matrix(h, size)), x, precision=lax.Precision.HIGHEST)
        x = jnp.einsum("pw,ntowc->ntopc", jnp.asarray(align_corners_matrix(w, size)), x, precision=lax.Precision.HIGHEST)
    return x[..., ::-1] * 128.0 + 128.0 - mean


def _read_weights(path: str) -> dict[str, np.ndarray]:
    """The named arrays of a .npz or .safetensors file; never unpickles. Raises ValueError naming the file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return dict(load_file(path))
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: one array (.npy), not named arrays; save them with np.savez(path, name=array, ...)")
        with loaded as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:
        if "pickle" in str(e).lower():  # numpy: pickled data / object arrays refused with allow_pickle=False
            raise ValueError(f"{path}: holds pickled Python objects, which are never loaded (unpickling can run "
                             "code); save plain numeric arrays with np.savez or safetensors") from None
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: cannot be read as .npz / .safetensors weights ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - zipfile.BadZipFile, EOFError, safetensors' own error: all unreadable
        raise ValueError(f"{path}: cannot be read as .npz / .safetensors weights ({type(e).__name__}: {e})") from None


def _normalise_key(key: str) -> str:
    for prefix in ("predictor/", "model.", "module."):
        key = key.removeprefix(prefix)
    key = key.replace("/", ".")
    if key.endswith(".W"):
        key = key[:-2] + ".weight"
    elif key.endswith(".b"):
        key = key[:-2] + ".bias"
    return key


def load_c3d_params(path: str, config: C3DConfig = C3DConfig()) -> dict:
    """Reads C3D-UCF101 weights (.npz or .safetensors; names and layouts in the module docstring) into the Flax
    tree `{'conv1a': {'kernel', 'bias'}, ..., 'fc8': {...}, 'mean': (T, 112, 112, 3)}`. Strict: every missing,
    unexpected or mis-shaped tensor is named."""
    from dreamvideo_jax.convert.torch_to_flax import convert_state_dict

    if not os.path.isfile(path):
        raise FileNotFoundError(f"C3D weights file {path!r} not found (see dreamvideo_jax.evaluation.c3d)")
    state = {_normalise_key(k): v for k, v in _read_weights(path).items()}
    mean = state.pop("mean", None)
    if mean is None:
        raise ValueError(f"{path}: no 'mean' (the BGR mean clip C3D subtracts); see dreamvideo_jax.evaluation.c3d")
    mean = np.asarray(mean, np.float32)
    if mean.ndim == 5 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 4 or mean.shape[:2] != (3, config.frames):
        raise ValueError(f"{path}: mean must be (3, {config.frames}, H, W) BGR; got {mean.shape}")
    if mean.shape[2:] != (config.size, config.size):
        if min(mean.shape[2:]) < 8 + config.size:
            raise ValueError(f"{path}: mean {mean.shape} is neither {config.size}x{config.size} nor croppable")
        mean = mean[:, :, 8 : 8 + config.size, 8 : 8 + config.size]  # TGAN2's crop
    shapes = jax.eval_shape(lambda: C3D(config).init(jax.random.key(0), jnp.zeros((1, config.frames, config.size,
                                                                                   config.size, 3))))["params"]
    params = convert_state_dict(state, shapes, what=path)
    params["mean"] = np.ascontiguousarray(np.transpose(mean, (1, 2, 3, 0)))
    return params


class C3DClassifier:
    """UCF101 logits of uint8 clips `(N, 16, H, W, 3)`, batched and jitted (a last partial batch is padded to
    `batch_size` once a full batch of that shape has run, so it reuses the compiled function)."""

    def __init__(self, params: dict, config: C3DConfig = C3DConfig(), *, batch_size: int = 16):
        params = dict(params)
        self.mean = jax.device_put(np.asarray(params.pop("mean"), np.float32))
        self.params = jax.device_put(params)
        self.config = config
        self.batch_size = int(batch_size)
        model = C3D(config)
        self._forward = jax.jit(lambda p, m, x: model.apply({"params": p}, preprocess(x, m, config.size)))
        self._full_batch_shapes: set[tuple] = set()

    @classmethod
    def from_file(cls, path: str, config: C3DConfig = C3DConfig(), **kw) -> "C3DClassifier":
        clf = cls(load_c3d_params(path, config), config, **kw)
        clf.source = path  # what a MetricSuite records as its c3d_weights
        return clf

    def __call__(self, videos) -> np.ndarray:
        v = np.asarray(videos)
        if v.dtype != np.uint8 or v.ndim != 5 or v.shape[1] != self.config.frames or v.shape[-1] != 3:
            raise ValueError(f"C3D takes uint8 (N, {self.config.frames}, H, W, 3) clips; got {v.dtype} {v.shape}")
        out = []
        for i in range(0, len(v), self.batch_size):
            chunk = v[i : i + self.batch_size]
            n = len(chunk)
            if n == self.batch_size:
                self._full_batch_shapes.add(chunk.shape[1:])
            elif chunk.shape[1:] in self._full_batch_shapes:  # pad: reuse the compiled full batch
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, 0)], 0)
            out.append(np.asarray(self._forward(self.params, self.mean, chunk))[:n])
        return np.concatenate(out, 0) if out else np.zeros((0, self.config.num_classes), np.float32)


def video_inception_score(videos, classifier: C3DClassifier, num_splits: int = 10,
                          logits: Optional[np.ndarray] = None) -> tuple[float, float]:  # fmt: skip
    """IS of uint8 clips `(N, 16, H, W, 3)` (or of precomputed `logits`) with the C3D-UCF101 classifier."""
    from dreamvideo_jax.evaluation.inception_score import inception_score

    if logits is None:
        logits = classifier(videos)
    return inception_score(logits, num_splits=num_splits)
