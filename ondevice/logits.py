"""Comparing next-token distributions: log-softmax, KL divergence and top-k agreement of logits.

One place for the arithmetic that the quantization report, the tuner's faithfulness check and
the CPU-vs-GPU checks all do on [positions, vocab] arrays of logits.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (llama.cpp sums exp() in double as well)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def kl_per_position(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(ref || other) in nats at each position of two [positions, vocab] logit arrays."""
    lp, lq = log_softmax(ref), log_softmax(other)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def agreement(ref: np.ndarray, other: np.ndarray, k: int = 5) -> dict[str, float]:
    """Per-position comparison of two [positions, vocab] logit arrays: mean and max KL, top-1
    agreement, top-k overlap, and the largest absolute logit difference next to the logits'
    scale."""
    kl = kl_per_position(ref, other)
    top_ref = np.argsort(-ref, axis=-1)[:, :k]
    top_other = np.argsort(-other, axis=-1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref, top_other, strict=True)]
    return {
        "positions": float(len(ref)),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1": float((top_ref[:, 0] == top_other[:, 0]).mean()),
        f"top{k}_overlap": float(np.mean(overlap)),
        "max_abs_diff": float(np.abs(ref - other).max()),
        "logit_scale": float(np.abs(ref).max()),
    }
