"""Predicts a model's peak memory from its GGUF header alone: weights + KV cache + compute + overhead.

Used by `ondevice info`, `ondevice fit`, `ondevice bench --profile` and `load()` (which refuses a
model that cannot fit the available memory). Each term follows what llama.cpp allocates and what
the process then really touches (resident pages, which is what the OS counts and kills for):

  weights   the tensor data. With mmap the pages are file-backed (the kernel could drop and
            re-read them) but they are all read at load and during every token, so they are
            resident; without mmap they are anonymous copies.
  repack    with llama.cpp's weight repacking (`use_extra_bufts`, on by default except on this
            project's AMX machines) the repackable matrices are copied into anonymous
            CPU_REPACK buffers while, with mmap, their file pages stay mapped and resident:
            those bytes count twice.
  kv        n_ctx × layers × (K row + V row) bytes for the cache type; llama.cpp clears the whole
            buffer at creation, so every page is resident from the start.
  compute   the part of llama.cpp's scheduler buffer that a prompt batch of n_ubatch tokens
            touches (activations of one layer, the attention mask, the matmul work buffer).
            llama.cpp *reserves* more ("compute buffer size" in its log: the logits of a whole
            micro-batch), but generation asks for one row of logits, and the untouched rest of
            a large malloc never becomes resident. `compute_reserved_bytes` is the reservation,
            which is what a GPU backend really allocates.
  overhead  the Python process with ondevice and llama.cpp loaded, plus the tokenizer's tables
            (llama.cpp's and our header's), which grow with the vocabulary and merges.

The coefficients were calibrated on this project's machine from llama.cpp's own log lines and
from measured peak RSS (benchmarks/fit_accuracy.py prints prediction next to measurement for
SmolLM2-135M and Phi-2-shaped Q4_K_M / Q8_0 at 512 and 2048 tokens).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ondevice import policy
from ondevice.errors import DoesNotFit, UsageError
from ondevice.gguf_header import GGUFHeader
from ondevice.settings import KV_TYPES

log = logging.getLogger(__name__)

MiB = 1024 * 1024

# RSS of a Python process that imported ondevice (and its CLI) and initialised llama.cpp,
# before any model: interpreter, numpy, psutil, click and the llama.cpp/ggml shared libraries.
# Measured here: 43 MiB for the library alone, 48 MiB for the CLI (about 21 MiB of it
# file-backed library pages).
RUNTIME_BASE_BYTES = 48 * MiB
# Per tokenizer entry (token or merge): llama.cpp's vocab maps and token-to-piece cache plus the
# Python strings of the header we parse first. Measured as the anonymous memory a load adds
# beyond the KV cache: 28.5 MiB for SmolLM2 (49152 tokens + 48900 merges) and 28.9 MiB for a
# Phi-2-shaped file (51200 + 50000): 300 bytes per entry.
TOKENIZER_BYTES_PER_ENTRY = 300
# Activations live at the widest point of one layer, per token of the micro-batch, in 4-byte
# floats of the embedding and FFN widths. Calibrated from the anonymous memory a 512-token
# micro-batch adds after the load (measured 18.7 MiB for SmolLM2 at ctx 2048, 87.5 MiB for
# Phi-2-shaped at ctx 512; these coefficients give 17.9 and 90.7).
ACT_EMBD_FLOATS = 6.0
ACT_FF_FLOATS = 3.0
# Without flash attention llama.cpp materialises the scores: f32, n_kv × tokens × heads, in the
# compute buffer (softmax works in place), plus an f16 copy of the probabilities that the CPU
# backend makes in its separate work buffer for the product with V. Calibrated: SmolLM2 at
# ctx 2048 without flash attention touches 45 MiB more than with it (6.3 bytes per score).
NOFA_SCORE_BYTES = 4
NOFA_WORK_BYTES = 2

# Effective bits per weight of llama.cpp's quantization presets (whole file over parameters,
# from the published Phi-2 GGUF sizes: some tensors stay at higher precision), for "which
# quant type would fit".
PRESET_BPW = {
    "F16": 16.0,
    "Q8_0": 8.52,
    "Q6_K": 6.59,
    "Q5_K_M": 5.76,
    "Q4_K_M": 5.06,
    "Q4_0": 4.60,
    "Q3_K_M": 3.95,
    "Q2_K": 3.25,
}


@dataclass
class Prediction:
    """Predicted resident memory of one loaded model, term by term, in bytes."""

    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    n_ctx: int
    kv_type: str
    repack_bytes: int = 0
    compute_reserved_bytes: int = 0
    n_ubatch: int = 512
    use_mmap: bool = True
    repack: bool = False
    flash_attn: bool = True  # resolved: whether attention runs fused

    @property
    def predicted_peak_bytes(self) -> int:
        return (
            self.weights_bytes
            + self.repack_bytes
            + self.kv_bytes
            + self.compute_bytes
            + self.overhead_bytes
        )

    @property
    def file_backed_bytes(self) -> int:
        """Resident pages the kernel could drop and re-read (the mapped model file)."""
        return self.weights_bytes if self.use_mmap else 0

    @property
    def anon_bytes(self) -> int:
        """Resident pages that only swap could free (copies, KV, compute, the process)."""
        return self.predicted_peak_bytes - self.file_backed_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["predicted_peak_bytes"] = self.predicted_peak_bytes
        out["file_backed_bytes"] = self.file_backed_bytes
        out["anon_bytes"] = self.anon_bytes
        return out


@dataclass
class FitReport:
    """`ondevice fit`'s answer: the prediction against a RAM budget, and what would fit."""

    prediction: Prediction
    ram_bytes: int
    model: str = ""
    max_ctx: int = 0  # the largest context that fits (0: none), capped at the trained one
    trained_ctx: int = 0
    quant_options: list[dict[str, Any]] = field(default_factory=list)
    kv_options: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.prediction.predicted_peak_bytes <= self.ram_bytes

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model, **self.prediction.to_dict()}
        out.update(
            ram_bytes=self.ram_bytes,
            fits=self.fits,
            headroom_bytes=self.ram_bytes - self.prediction.predicted_peak_bytes,
            max_ctx=self.max_ctx,
            trained_ctx=self.trained_ctx,
            quant_options=self.quant_options,
            kv_options=self.kv_options,
            notes=self.notes,
        )
        return out


# --- the terms ------------------------------------------------------------------------------
def kv_type_problem(header: GGUFHeader, kv_type: str) -> str | None:
    """Why llama.cpp would refuse this KV cache type for this model, or None if it's fine."""
    return policy.kv_type_problem(header.head_dims, kv_type, header.architecture)


def kv_cache_bytes(header: GGUFHeader, n_ctx: int, kv_type: str = "f16") -> int:
    """Bytes of the KV cache for n_ctx tokens: layers × cells × (K + V row bytes), where
    llama.cpp rounds the context up to a multiple of 256 cells."""
    d = header.dims()
    n_ctx = padded_ctx(n_ctx)
    kv = KV_TYPES[kv_type]
    row_k = d.k_len * d.n_head_kv // kv.block * kv.block_bytes
    row_v = d.v_len * d.n_head_kv // kv.block * kv.block_bytes
    return n_ctx * d.n_layer * (row_k + row_v)


def padded_ctx(n_ctx: int) -> int:
    """The context llama.cpp really allocates: n_ctx rounded up to 256 cells."""
    return -(-n_ctx // 256) * 256


def _mask_bytes(n_ctx: int, n_tokens: int, flash_attn: bool) -> int:
    # The KQ mask input: n_kv × n_tokens, f16 for flash attention, f32 otherwise; n_kv is at
    # most the padded context.
    return padded_ctx(n_ctx) * n_tokens * (2 if flash_attn else 4)


def flash_attn_default(header: GGUFHeader, kv_type: str = "f16") -> bool:
    """Whether `flash_attn="auto"` runs fused attention on the CPU for this model: only with a
    quantized KV cache, which needs it (`ondevice.policy.attention_settings` says why)."""
    return policy.flash_attn_on_cpu(kv_type)


def compute_resident_bytes(
    header: GGUFHeader, n_ctx: int, n_ubatch: int = 512, flash_attn: bool = True
) -> int:
    """Compute-buffer bytes a full micro-batch of prompt touches (one output row of logits).

    The widest point of a layer holds a few embedding-wide and FFN-wide f32 activations per
    token; the matmul work buffer holds the quantized copy of one of them. Without flash
    attention the scores (n_kv × tokens × heads) and their f16 copy are added (counted on top
    of the activations, not beside them: an overestimate of a few percent of the total).
    """
    d = header.dims()
    t = min(n_ubatch, n_ctx)
    acts = t * 4 * (ACT_EMBD_FLOATS * d.n_embd + ACT_FF_FLOATS * d.n_ff)
    out = acts + _mask_bytes(n_ctx, t, flash_attn) + 4 * d.n_vocab
    if not flash_attn:
        scores = padded_ctx(n_ctx) * t * d.n_head
        out += scores * (NOFA_SCORE_BYTES + NOFA_WORK_BYTES)
    return int(out)


def compute_bytes(header: GGUFHeader, n_ctx: int, n_ubatch: int = 512) -> int:
    """llama.cpp's compute-buffer reservation for one micro-batch ("compute buffer size"):
    the larger of a layer's activations and the logits of every token of the micro-batch,
    plus the mask. This is what a GPU backend allocates in device memory."""
    return compute_reserved_bytes(header, n_ctx, n_ubatch)


def compute_reserved_bytes(
    header: GGUFHeader, n_ctx: int, n_ubatch: int = 512, flash_attn: bool = True
) -> int:
    d = header.dims()
    t = min(n_ubatch, n_ctx)
    layer = compute_resident_bytes(header, n_ctx, n_ubatch, flash_attn) - 4 * d.n_vocab
    if not flash_attn:  # the f16 copy lives in the CPU backend's work buffer, not here
        layer -= padded_ctx(n_ctx) * t * d.n_head * NOFA_WORK_BYTES
    logits = t * 4 * (d.n_vocab + d.n_embd) + _mask_bytes(n_ctx, t, flash_attn)
    return int(max(layer, logits))


def tokenizer_entries(header: GGUFHeader) -> int:
    md = header.metadata
    n = 0
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        value = md.get(key)
        if isinstance(value, list):
            n += len(value)
    return n


def overhead_bytes(header: GGUFHeader) -> int:
    """The process without the model's buffers: interpreter, libraries, tokenizer tables."""
    return RUNTIME_BASE_BYTES + TOKENIZER_BYTES_PER_ENTRY * tokenizer_entries(header)


def repackable_bytes(header: GGUFHeader, family: str) -> int:
    """Bytes of the weight matrices llama.cpp would repack on this CPU family
    (`ondevice.policy.repack_family`): 2-D matrices that feed a matrix multiply of a type the
    family has kernels for, with a row count the interleaved layout divides. The token
    embeddings are row lookups and stay as they are, but a model without output.weight (tied
    embeddings: SmolLM2, Llama-3.2-1B) multiplies by them in its output layer, and llama.cpp
    repacks that use's copy: on ARM a Q8_0 token_embd becomes a repacked copy as large as
    itself (measured under qemu, issue 19)."""
    rows = policy.REPACK_TYPES[family]
    tied = not any(t.name == "output.weight" for t in header.tensors)
    total = 0
    for t in header.tensors:
        if len(t.shape) != 2 or (t.name.startswith("token_embd") and not tied):
            continue
        if t.type_name in rows and t.shape[1] % rows[t.type_name] == 0:
            total += t.n_bytes
    return total


def predict(
    header: GGUFHeader,
    n_ctx: int,
    kv_type: str = "f16",
    n_ubatch: int = 512,
    *,
    use_mmap: bool = True,
    repack: bool = False,
    flash_attn: bool | None = None,
    repack_family: str = "none",
) -> Prediction:
    """Predict the peak resident memory of this model loaded at n_ctx on the CPU.

    Pure arithmetic over the header and the facts passed in:
    repack         whether llama.cpp repacks weights (ondevice turns it off on AMX builds; it
                   is on by default elsewhere: `ondevice.policy.repack_allowed`).
    repack_family  which CPU kernels would repack (`ondevice.policy.repack_family` of the
                   CPU's features); only matters with `repack`.
    flash_attn     whether attention runs fused; None = what `flash_attn="auto"` does on the
                   CPU for this model (`flash_attn_default`).
    """
    if flash_attn is None:
        flash_attn = flash_attn_default(header, kv_type)
    weights = header.tensor_bytes
    extra = repackable_bytes(header, repack_family) if repack else 0
    return Prediction(
        weights_bytes=weights,
        kv_bytes=kv_cache_bytes(header, n_ctx, kv_type),
        compute_bytes=compute_resident_bytes(header, n_ctx, n_ubatch, flash_attn),
        overhead_bytes=overhead_bytes(header),
        n_ctx=n_ctx,
        kv_type=kv_type,
        # Without mmap the repacked tensors replace their plain copies; with mmap both stay.
        repack_bytes=extra if use_mmap else 0,
        compute_reserved_bytes=compute_reserved_bytes(header, n_ctx, n_ubatch, flash_attn),
        n_ubatch=n_ubatch,
        use_mmap=use_mmap,
        repack=repack,
        flash_attn=flash_attn,
    )


def available_memory_bytes() -> int:
    """Memory the OS could give us now without swapping (free + reclaimable cache)."""
    return int(psutil.virtual_memory().available)


def check_fits(
    header: GGUFHeader,
    n_ctx: int,
    kv_type: str = "f16",
    n_ubatch: int = 512,
    *,
    use_mmap: bool = True,
    flash_attn: bool | None = None,
    available: int | None = None,
    repack: bool = False,
    repack_family: str = "none",
) -> Prediction:
    """What `load()` asks before llama.cpp allocates anything: raise DoesNotFit when the
    predicted peak would not fit the available memory (the OS would swap or kill us)."""
    kw: dict[str, Any] = dict(
        use_mmap=use_mmap, repack=repack, flash_attn=flash_attn, repack_family=repack_family
    )
    pred = predict(header, n_ctx, kv_type, n_ubatch, **kw)
    avail = available_memory_bytes() if available is None else available
    # The running interpreter is already resident: only the rest has to come out of `avail`.
    need = pred.predicted_peak_bytes - RUNTIME_BASE_BYTES
    if need <= avail:
        return pred
    best = max_context(header, avail + RUNTIME_BASE_BYTES, kv_type, n_ubatch=n_ubatch, **kw)
    gib = 1024**3
    terms = (
        f"weights {pred.weights_bytes / gib:.2f} + KV {pred.kv_bytes / gib:.2f} + compute "
        f"{pred.compute_bytes / gib:.2f} + overhead {pred.overhead_bytes / gib:.2f}"
        + (f" + repacked {pred.repack_bytes / gib:.2f}" if pred.repack_bytes else "")
    )
    options = []
    if best:
        options.append(f"n_ctx={best} (--ctx {best}) fits")
    if kv_type in ("f16", "bf16", "f32") and kv_type_problem(header, "q8_0") is None:
        options.append("kv_type='q8_0' halves the KV cache")
    options.append("a smaller quantization, or force=True (--force) to load anyway")
    raise DoesNotFit(
        f"{Path(header.path).name} needs about {pred.predicted_peak_bytes / gib:.2f} GiB at "
        f"n_ctx {n_ctx} ({terms} GiB) but only {avail / gib:.2f} GiB of memory is available",
        hint="; ".join(options),
    )


# --- what would fit -------------------------------------------------------------------------
def max_context(
    header: GGUFHeader, ram_bytes: int, kv_type: str = "f16", cap: int | None = None, **kw: Any
) -> int:
    """The largest context (a multiple of 256, at most `cap`) whose prediction fits, or 0."""
    cap = cap or int(header.arch_value("context_length", 0) or 0) or 131072
    lo, hi = 0, cap // 256
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predict(header, mid * 256, kv_type, **kw).predicted_peak_bytes <= ram_bytes:
            lo = mid
        else:
            hi = mid - 1
    if lo == cap // 256 and cap % 256:
        if predict(header, cap, kv_type, **kw).predicted_peak_bytes <= ram_bytes:
            return cap
    return lo * 256


def quant_options(
    header: GGUFHeader, ram_bytes: int, n_ctx: int, kv_type: str = "f16", **kw: Any
) -> list[dict[str, Any]]:
    """For each llama.cpp preset, the predicted peak if the model were quantized to it (from
    the preset's effective bits per weight) and whether it would fit."""
    base = predict(header, n_ctx, kv_type, **kw)
    n_params = header.n_params
    out = []
    for name, bpw in PRESET_BPW.items():
        weights = int(n_params * bpw / 8)
        peak = base.predicted_peak_bytes - base.weights_bytes - base.repack_bytes + weights
        out.append(
            {
                "type": name,
                "weights_bytes": weights,
                "predicted_peak_bytes": peak,
                "fits": peak <= ram_bytes,
            }
        )
    return out


def fit_report(
    header: GGUFHeader,
    ram_bytes: int,
    n_ctx: int,
    kv_type: str = "f16",
    *,
    model: str = "",
    **kw: Any,
) -> FitReport:
    """Predict, compare with `ram_bytes`, and list the contexts / KV types / quants that fit."""
    problem = kv_type_problem(header, kv_type)
    if problem:
        raise UsageError(problem, hint="use --kv f16 for this model")
    pred = predict(header, n_ctx, kv_type, **kw)
    trained = int(header.arch_value("context_length", 0) or 0)
    rep = FitReport(pred, ram_bytes, model=model, trained_ctx=trained)
    rep.max_ctx = max_context(header, ram_bytes, kv_type, cap=trained or None, **kw)
    for kv in ("f16", "q8_0", "q4_0"):
        why = kv_type_problem(header, kv)
        if why:
            rep.kv_options.append({"kv_type": kv, "allowed": False, "why": why})
            continue
        p = predict(header, n_ctx, kv, **kw)
        rep.kv_options.append(
            {
                "kv_type": kv,
                "allowed": True,
                "kv_bytes": p.kv_bytes,
                "predicted_peak_bytes": p.predicted_peak_bytes,
                "fits": p.predicted_peak_bytes <= ram_bytes,
            }
        )
    rep.quant_options = quant_options(header, ram_bytes, n_ctx, kv_type, **kw)
    if trained and n_ctx > trained:
        rep.notes.append(f"n_ctx {n_ctx} is beyond the trained context {trained}")
    return rep


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_bytes(text: str | int) -> int:
    """ "4GB" → 4e9, "3.5GiB" → 3.5·2³⁰, "512MiB", "2000000000"; UsageError otherwise."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(
            f"cannot read {text!r} as an amount of memory",
            hint="write it like 4GB, 3.5GiB or 512MiB",
        )
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UsageError(f"memory must be more than 0, got {text!r}")
    return int(value)
