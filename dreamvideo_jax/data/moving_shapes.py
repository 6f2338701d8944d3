"""Synthetic moving-shapes clips: one coloured shape moving in the direction its caption names.

Deterministic by seed: clip ``i`` of split ``s`` is drawn from ``np.random.default_rng([seed, split_id, i])``,
so any clip can be regenerated alone. The shape stays fully inside the frame in every frame and moves a whole
number of pixels per frame (``speed``, along both axes for diagonals) on a static, faint sinusoidal grey texture.
With ``centred_start`` (the default), frame 0's object lies in the central box from which every motion fits, so
the first frame -- the reference image of image-to-video -- says nothing about where the object goes: the motion
can only come from the caption. (Drawing the start from where *this* clip's motion fits would put left-movers on
the right and so on; a model then reads the direction off the image and ignores the text.)

Captions follow one grammar: ``"a {colour} {shape} moves {direction}"`` or ``"a {colour} {shape} stays still"``.
Splits: ``train`` and ``validation`` draw from every (shape, colour, motion) combination except
:data:`HELD_OUT`; ``test`` draws only from :data:`HELD_OUT` (compositional generalisation). Each record carries
its metadata (shape, colour, motion, speed, size, start position, per-frame centroid) so evaluation can check
the motion of generated videos. Coordinates are image pixels: ``x`` to the right, ``y`` downwards, ``(x, y)``
order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json

import numpy as np
import tensorflow_datasets as tfds

from dreamvideo_jax.data.report import BuildReport
from dreamvideo_jax.data.tfds_base import ArrayRecordBuilder

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 20),
    "magenta": (220, 40, 220),
    "cyan": (20, 210, 220),
}
COLOUR_NAMES = tuple(COLOURS)
# (dx, dy) unit steps, y pointing down.
DIRECTION_VECTORS = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up-left": (-1, -1),
    "up-right": (1, -1),
    "down-left": (-1, 1),
    "down-right": (1, 1),
}
DIRECTIONS = tuple(DIRECTION_VECTORS)
STILL = "still"
MOTIONS = DIRECTIONS + (STILL,)  # label = index in this tuple
# (shape, colour, motion) combinations never seen in train/validation; the test split uses only these.
HELD_OUT = (
    ("circle", "red", "left"),
    ("square", "green", "right"),
    ("triangle", "blue", "up"),
    ("diamond", "yellow", "down"),
    ("circle", "magenta", "up-left"),
    ("square", "cyan", "up-right"),
    ("triangle", "red", "down-left"),
    ("diamond", "green", "down-right"),
    ("circle", "blue", "still"),
)
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def caption_for(shape: str, colour: str, motion: str) -> str:
    if motion == STILL:
        return f"a {colour} {shape} stays still"
    return f"a {colour} {shape} moves {motion}"


def parse_caption(caption: str | bytes) -> tuple[str, str, str]:
    """Inverse of :func:`caption_for`: returns (shape, colour, motion)."""
    if isinstance(caption, bytes):
        caption = caption.decode()
    words = caption.split()
    if len(words) != 5 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(f"not a moving-shapes caption: {caption!r}")
    if words[3:] == ["stays", "still"]:
        return words[2], words[1], STILL
    if words[3] == "moves" and words[4] in DIRECTION_VECTORS:
        return words[2], words[1], words[4]
    raise ValueError(f"not a moving-shapes caption: {caption!r}")


def classify_displacement(dx: float, dy: float, still_px: float = 0.5) -> str:
    """Motion name for a centroid displacement (x right, y down): one of :data:`MOTIONS`."""
    if np.hypot(dx, dy) < still_px:
        return STILL
    angle = np.degrees(np.arctan2(-dy, dx)) % 360  # counter-clockwise from "right", y up
    names = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
    return names[int(((angle + 22.5) % 360) // 45)]


def combinations(split: str) -> list[tuple[str, str, str]]:
    """The (shape, colour, motion) combinations a split draws from."""
    if split == "test":
        return list(HELD_OUT)
    held = set(HELD_OUT)
    return [c for c in itertools.product(SHAPES, COLOUR_NAMES, MOTIONS) if c not in held]


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of a shape filling its box."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = size / 2.0
    if shape == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= c**2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "triangle":  # apex at the top, base at the bottom
        return np.abs(xx - c) <= yy / 2.0
    if shape == "diamond":
        return np.abs(xx - c) + np.abs(yy - c) <= c
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Generation parameters. Object sizes of 0 scale with the frame size (6-10 px at 32x32). Speeds of 0 scale
    too (1-2 px/frame at 32x32), capped with ``centred_start`` so that the start box is not empty (1 px/frame at
    32x32x8).

    ``centred_start=1``: frame 0's object is drawn from the box ``[T, size - object - T]`` on both axes, where
    ``T = (frames - 1) * max_speed`` is the longest travel, so its position is independent of the motion (and the
    speed). ``0``: drawn from where this clip's own motion fits (the position then hints at the motion).
    """

    size: int = 32
    frames: int = 8
    min_object: int = 0
    max_object: int = 0
    min_speed: int = 0
    max_speed: int = 0
    centred_start: int = 1

    def resolved(self) -> ClipSpec:
        s = self.size / 32.0
        lo, hi = self.min_object or max(3, round(6 * s)), self.max_object or max(3, round(10 * s))
        hi = max(lo, hi)
        vhi = max(1, round(2 * s))
        if self.centred_start:
            vhi = max(1, min(vhi, (self.size - hi) // (2 * max(1, self.frames - 1))))
        vlo, vhi = self.min_speed or min(max(1, round(1 * s)), vhi), self.max_speed or vhi
        spec = dataclasses.replace(self, min_object=lo, max_object=hi, min_speed=vlo, max_speed=max(vlo, vhi))
        if spec.max_object + (spec.frames - 1) * spec.min_speed > spec.size:
            raise ValueError(
                f"a {spec.max_object}px object moving {spec.min_speed}px/frame for {spec.frames} frames does not "
                f"fit in {spec.size}px; use fewer frames, a larger size or smaller objects."
            )
        travel = (spec.frames - 1) * spec.max_speed
        if spec.centred_start and spec.max_object + 2 * travel > spec.size:
            raise ValueError(
                f"centred_start=1 needs room for a {spec.max_object}px object to move {travel}px either way from "
                f"frame 0 ({spec.max_object} + 2*{travel} > {spec.size}px); use fewer frames, a larger size, "
                "smaller objects or speeds, or centred_start=0 (the start position then hints at the motion)."
            )
        return spec


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.35, 0.6)
    tex = np.zeros((size, size), np.float32)
    for _ in range(2):
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(1.0, 4.0), rng.uniform(0, 2 * np.pi)
        tex += np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
    tint = rng.uniform(-0.02, 0.02, size=3).astype(np.float32)
    bg = base + rng.uniform(0.02, 0.05) * tex[..., None] + tint
    return np.clip(bg * 255.0, 0, 255).astype(np.float32)


def generate_clip(seed: int, split: str, index: int, spec: ClipSpec = ClipSpec()) -> dict:
    """One clip and its metadata, a pure function of (seed, split, index, spec)."""
    spec = spec.resolved()
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    combos = combinations(split)
    shape, colour, motion = combos[rng.integers(len(combos))]
    obj = int(rng.integers(spec.min_object, spec.max_object + 1))
    room = spec.size - obj  # top-left coordinate range is [0, room]
    dx, dy = DIRECTION_VECTORS.get(motion, (0, 0))
    if motion == STILL:
        speed = 0
    else:
        max_fit = room // max(1, spec.frames - 1)
        speed = int(rng.integers(spec.min_speed, min(spec.max_speed, max_fit) + 1))
    travel = (spec.frames - 1) * speed
    margin = (spec.frames - 1) * spec.max_speed  # centred_start: the same box for every motion and speed

    def start(d):
        if spec.centred_start:
            lo, hi = margin, room - margin
        else:
            lo, hi = (travel, room) if d < 0 else (0, room - travel) if d > 0 else (0, room)
        return int(rng.integers(lo, hi + 1))

    x0, y0 = start(dx), start(dy)
    bg = _background(rng, spec.size)
    mask = shape_mask(shape, obj)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5  # centroid inside the box (pixel centres)
    rgb = np.asarray(COLOURS[colour], np.float32)
    video = np.repeat(bg[None], spec.frames, axis=0)
    centroids = np.zeros((spec.frames, 2), np.float32)
    for t in range(spec.frames):
        x, y = x0 + t * speed * dx, y0 + t * speed * dy
        video[t, y : y + obj, x : x + obj][mask] = rgb
        centroids[t] = (x + cx, y + cy)
    return {
        "video": video.astype(np.uint8),
        "caption": caption_for(shape, colour, motion),
        "shape": shape,
        "colour": colour,
        "motion": motion,
        "label": np.int32(MOTIONS.index(motion)),
        "speed": np.int32(speed),
        "object_size": np.int32(obj),
        "start": np.asarray([x0, y0], np.int32),
        "velocity": np.asarray([dx * speed, dy * speed], np.float32),
        "centroids": centroids,
        "held_out": (shape, colour, motion) in set(HELD_OUT),
    }


@dataclasses.dataclass
class MovingShapesConfig(tfds.core.BuilderConfig):
    """Build options; :func:`config_name` derives a name that changes whenever an option does."""

    size: int = 32
    frames: int = 8
    num_train: int = 5000
    num_validation: int = 500
    num_test: int = 500
    seed: int = 0
    min_object: int = 0
    max_object: int = 0
    min_speed: int = 0
    max_speed: int = 0
    centred_start: int = 1

    @property
    def spec(self) -> ClipSpec:
        return ClipSpec(self.size, self.frames, self.min_object, self.max_object, self.min_speed, self.max_speed,
                        self.centred_start)


_OPTION_KEYS = ("size", "frames", "num_train", "num_validation", "num_test", "seed", "min_object", "max_object",
                "min_speed", "max_speed", "centred_start")  # fmt: skip


_REGISTERED: dict = {}  # name -> the config object registered in MovingShapes.BUILDER_CONFIGS


def _full_options(**options) -> dict:
    return {k: int(options.get(k, getattr(MovingShapesConfig, k))) for k in _OPTION_KEYS}


def config_name(**options) -> str:
    """'32px_8f_<hash>' where the hash covers every option (so a changed option never reuses a stale build)."""
    full = _full_options(**options)
    digest = hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:8]
    return f"{full['size']}px_{full['frames']}f_{digest}"


def make_config(**options) -> MovingShapesConfig:
    full = _full_options(**options)
    registered = _REGISTERED.get(config_name(**full))
    if registered is not None:  # tfds accepts a registered config's name only with that very object
        return registered
    cfg = MovingShapesConfig(name=config_name(**full), description=json.dumps(full, sort_keys=True), **full)
    cfg.spec.resolved()  # validate early
    return cfg


class MovingShapes(ArrayRecordBuilder):
    """Synthetic clips of a coloured shape moving as its caption says (see the module docstring)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release.",
        "1.1.0": "centred_start (default on): frame 0's position no longer depends on the motion.",
    }
    BUILDER_CONFIGS = [make_config()]
    _REGISTERED[BUILDER_CONFIGS[0].name] = BUILDER_CONFIGS[0]
    DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name

    def __init__(self, *args, report: BuildReport | None = None, **kwargs):
        self.report = report or BuildReport()
        super().__init__(*args, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        f = tfds.features
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=f.FeaturesDict(
                {
                    "video": f.Tensor(shape=(c.frames, c.size, c.size, 3), dtype=np.uint8, encoding=f.Encoding.BYTES),
                    "caption": f.Text(),
                    "shape": f.Text(),
                    "colour": f.Text(),
                    "motion": f.Text(),
                    "label": f.Scalar(dtype=np.int32, doc="index of the motion in MOTIONS"),
                    "speed": f.Scalar(dtype=np.int32, doc="pixels per frame along each moving axis"),
                    "object_size": f.Scalar(dtype=np.int32),
                    "start": f.Tensor(shape=(2,), dtype=np.int32, doc="top-left (x, y) at frame 0"),
                    "velocity": f.Tensor(shape=(2,), dtype=np.float32, doc="(dx, dy) pixels per frame"),
                    "centroids": f.Tensor(shape=(c.frames, 2), dtype=np.float32, doc="(x, y) per frame"),
                    "held_out": f.Scalar(dtype=np.bool_),
                }
            ),
            homepage="https://arxiv.org/abs/2312.03018",
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        counts = {"train": c.num_train, "validation": c.num_validation, "test": c.num_test}
        return {s: self._generate_examples(s, n) for s, n in counts.items() if n > 0}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        spec = c.spec.resolved()
        for i in range(n):
            ex = generate_clip(c.seed, split, i, spec)
            self.report.write(split)
            yield f"{split}-{i:08d}", ex
