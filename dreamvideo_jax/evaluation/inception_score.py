"""Inception Score from classifier outputs (Salimans et al., 2016), the standard split formula.

    IS = exp( E_x KL(p(y|x) || p(y)) ),   p(y) = mean over the split of p(y|x)

computed on ``num_splits`` consecutive, equal-sized splits of the samples (10 by default, as TGAN/TGAN2,
StyleGAN-V and MAGVIT report for UCF101); the result is the mean and standard deviation over splits. Logits are
turned into log-probabilities with a log-softmax in float64, so confident predictions do not lose precision;
given probabilities, zeros contribute 0 (the limit of p log p).

For video IS on UCF101 the classifier is C3D fine-tuned on UCF101 (:mod:`.c3d`), 16 frames at 112x112.
"""

from __future__ import annotations

import numpy as np


def _log_probs(logits=None, probs=None) -> np.ndarray:
    if (logits is None) == (probs is None):
        raise ValueError("pass exactly one of logits= or probs=")
    if logits is not None:
        z = np.asarray(logits, np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.asarray(probs, np.float64)
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("probs must be non-negative rows summing to 1")
    with np.errstate(divide="ignore"):
        return np.log(p)


def inception_score(logits=None, *, probs=None, num_splits: int = 10) -> tuple[float, float]:
    """Inception Score of class predictions `(N, K)`: returns (mean, std) over `num_splits` splits.

    Pass `logits` (preferred) or `probs`. N must be at least `num_splits`; when N is not divisible the splits
    are ``[i*N//S, (i+1)*N//S)`` as in the reference code.
    """
    logp = _log_probs(logits, probs)
    if logp.ndim != 2:
        raise ValueError(f"predictions must be (N, classes); got shape {logp.shape}")
    n = logp.shape[0]
    if not 1 <= num_splits <= n:
        raise ValueError(f"num_splits={num_splits} must be in [1, N={n}]")
    scores = []
    for i in range(num_splits):
        part = logp[i * n // num_splits : (i + 1) * n // num_splits]
        p = np.exp(part)
        with np.errstate(divide="ignore", invalid="ignore"):  # classes no sample predicts: 0 * log 0 = 0
            log_marginal = np.log(p.mean(0, keepdims=True))
            terms = np.where(p > 0, p * (part - log_marginal), 0.0)
        scores.append(float(np.exp(terms.sum(1).mean())))
    return float(np.mean(scores)), float(np.std(scores))
