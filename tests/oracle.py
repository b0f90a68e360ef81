"""llama.cpp (through ondevice.load, Model.score and Model.raw) against transformers, for the
converter's proofs: every position's logits, greedy continuations, and token ids.

The llama.cpp side runs with an f32 KV cache: the default f16 cache alone moves logits by about
1e-3 of their scale (FIELD-NOTES), which would hide what the converter gets wrong or right.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import ondevice


@contextlib.contextmanager
def load_f32(path: Path, n_ctx: int = 256) -> Iterator[Any]:
    with ondevice.load(path, n_ctx=n_ctx, threads=2, kv_type="f32", tune=False) as model:
        yield model


def llama_logits(model: Any, ids: list[int]) -> np.ndarray:
    return model.score(ids)


def llama_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """llama.cpp's own incremental decoding (KV cache), greedy."""
    with model.raw() as eng:
        eng.kv_clear()
        eng.decode(ids)
        out = []
        for _ in range(n):
            token = int(np.argmax(eng.logits_last()))
            out.append(token)
            eng.decode_one(token)
    return out


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, with its KV cache."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        result = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            result = model(torch.tensor([[token]]), cache=result.cache, use_cache=True)
    return out


def relative_diff(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max |Δlogit| / logit scale, the scale), the scale being max |logit| of transformers."""
    scale = float(np.abs(expected).max())
    return float(np.abs(got - expected).max()) / scale, scale
