"""Fréchet distance between two Gaussians fitted to feature sets, with streaming statistics.

    FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 sqrtm(S_1 S_2))

``sqrtm`` is ``scipy.linalg.sqrtm`` and only its real part is kept, as in the reference FVD/FID code
(pytorch-fid, StyleGAN-V). If the product is singular enough for ``sqrtm`` to return non-finite values, both
covariances get ``eps * I`` added first (pytorch-fid's fallback).

Covariance convention: :class:`FeatureStats` keeps exact float64 sums, so any ``ddof`` can be asked for later.
The default is ``ddof=1`` (the unbiased estimate: ``np.cov``'s default and what TF-GAN's
``frechet_classifier_distance_from_activations`` -- used by the original FVD code -- computes). StyleGAN-V's
``fvd2048_16f`` uses ``ddof=0``; the two differ by a factor ``N / (N - 1)`` on the covariances, i.e. well under
0.1% of FVD at N = 2048. Whichever is used is recorded with the number.

Statistics are accumulated batch by batch (Chan et al.'s pairwise update of the mean and the centred sum of
outer products, in float64), so the features of thousands of clips never need to be held at once; they can be
merged across workers and saved to / loaded from ``.npz`` (e.g. the real-data statistics of a benchmark).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np


class FeatureStats:
    """Running count, mean and centred sum of outer products of feature vectors (float64)."""

    def __init__(self, dim: Optional[int] = None, meta: Optional[dict] = None):
        self.n = 0
        self.dim = dim
        self._mean = None if dim is None else np.zeros(dim, np.float64)
        self._m2 = None if dim is None else np.zeros((dim, dim), np.float64)
        self.meta = dict(meta or {})

    def _init(self, dim: int):
        if self.dim is None:
            self.dim = dim
            self._mean = np.zeros(dim, np.float64)
            self._m2 = np.zeros((dim, dim), np.float64)
        elif dim != self.dim:
            raise ValueError(f"feature size {dim} does not match the statistics' size {self.dim}")

    def update(self, features) -> "FeatureStats":
        """Adds a batch of features `(B, D)` (any float dtype; non-finite values raise)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (batch, dim); got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf (a broken input clip or model?)")
        self._init(x.shape[1])
        b = x.shape[0]
        if b == 0:
            return self
        bmean = x.mean(0)
        xc = x - bmean
        self._merge(b, bmean, xc.T @ xc)
        return self

    def _merge(self, nb: int, bmean: np.ndarray, bm2: np.ndarray):
        n = self.n
        total = n + nb
        delta = bmean - self._mean
        self._mean = self._mean + delta * (nb / total)
        self._m2 = self._m2 + bm2 + np.outer(delta, delta) * (n * nb / total)
        self.n = total

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Adds the samples summarised by `other` (e.g. another worker's shard)."""
        if other.n == 0:
            return self
        self._init(other.dim)
        self._merge(other.n, other._mean, other._m2)
        return self

    @property
    def mean(self) -> np.ndarray:
        self._check_nonempty(1)
        return self._mean.copy()

    def cov(self, ddof: int = 1) -> np.ndarray:
        """Covariance matrix; `ddof=1` divides by N - 1 (np.cov's default), `ddof=0` by N."""
        self._check_nonempty(ddof + 1)
        return self._m2 / (self.n - ddof)

    def _check_nonempty(self, need: int):
        if self.n < need:
            raise ValueError(f"need at least {need} feature vectors, have {self.n}")

    # -- persistence (for cached reference statistics and resumable runs) --
    def state_dict(self) -> dict:
        return {"n": np.int64(self.n), "mean": self._mean, "m2": self._m2, "meta": json.dumps(self.meta, sort_keys=True)}

    @classmethod
    def from_state_dict(cls, state) -> "FeatureStats":
        s = cls(meta=json.loads(str(state["meta"])) if "meta" in state else None)
        s.n = int(state["n"])
        if state["mean"] is not None and np.ndim(state["mean"]) == 1:
            s.dim = int(np.shape(state["mean"])[0])
            s._mean = np.asarray(state["mean"], np.float64)
            s._m2 = np.asarray(state["m2"], np.float64)
        return s

    def save(self, path: str) -> str:
        """Writes the statistics to `path` (.npz, written atomically)."""
        if self.dim is None:
            raise ValueError("cannot save empty statistics")
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, **self.state_dict())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as f:
            return cls.from_state_dict({k: f[k] for k in f.files})

    def __repr__(self):
        return f"FeatureStats(n={self.n}, dim={self.dim})"


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, real part of scipy's sqrtm)."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats, ddof: int = 1) -> float:
    return frechet_distance(a.mean, a.cov(ddof), b.mean, b.cov(ddof))


def frechet_distance_from_features(feats1, feats2, ddof: int = 1) -> float:
    """Fréchet distance between two feature arrays `(N, D)` (each N >= 2)."""
    return frechet_distance_from_stats(FeatureStats().update(feats1), FeatureStats().update(feats2), ddof)
