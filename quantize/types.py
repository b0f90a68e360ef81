"""The quantization file types llama.cpp offers, with their typical size per weight.

The list comes from the installed binding (its `LLAMA_FTYPE_*` constants), so a newer llama.cpp
brings its new types along. Sizes are what llama.cpp's own `llama-quantize` documents: the
Llama-3-8B file sizes in its type table (converted to bits per weight, output and embedding
tensors included) and the stated bits per weight of the IQ/TQ types. A small model's real size
per weight differs (see `ondevice quantize --report`): its embedding is a larger share, and
k-quant rows that are not a multiple of 256 wide fall back to a legacy type.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ondevice._native.quantizer import file_types
from ondevice.errors import UsageError

# name -> (typical bits per weight, what it is). Derived from llama.cpp tools/quantize/quantize.cpp
# (Llama-3-8B: GiB * 2**33 / 8.03e9 parameters; IQ types: the stated bpw).
_KNOWN: dict[str, tuple[float, str]] = {
    "F32": (32.0, "32-bit floats, no quantization"),
    "F16": (16.0, "16-bit floats (1-d tensors stay F32)"),
    "BF16": (16.0, "bfloat16 (1-d tensors stay F32)"),
    "Q8_0": (8.51, "8-bit, nearly lossless"),
    "Q6_K": (6.57, "6-bit k-quant"),
    "Q5_K_M": (5.70, "5-bit k-quant, some tensors at Q6_K"),
    "Q5_K_S": (5.57, "5-bit k-quant"),
    "Q5_1": (6.04, "5-bit legacy, with offsets"),
    "Q5_0": (5.57, "5-bit legacy"),
    "Q4_K_M": (4.90, "4-bit k-quant, some tensors at Q6_K (the usual choice)"),
    "Q4_K_S": (4.67, "4-bit k-quant"),
    "Q4_1": (5.11, "4-bit legacy, with offsets"),
    "Q4_0": (4.64, "4-bit legacy"),
    "IQ4_NL": (4.50, "4-bit non-linear"),
    "IQ4_XS": (4.25, "4-bit non-linear, smaller"),
    "Q3_K_L": (4.31, "3-bit k-quant, some tensors at Q5_K"),
    "Q3_K_M": (4.00, "3-bit k-quant, some tensors at Q4_K/Q5_K"),
    "Q3_K_S": (3.65, "3-bit k-quant"),
    "IQ3_M": (3.66, "3-bit i-quant mix"),
    "IQ3_S": (3.44, "3-bit i-quant"),
    "IQ3_XS": (3.30, "3-bit i-quant, smaller"),
    "IQ3_XXS": (3.06, "3-bit i-quant, needs an imatrix"),
    "Q2_K": (3.17, "2-bit k-quant, some tensors at Q3_K/Q4_K"),
    "Q2_K_S": (3.17, "2-bit k-quant, needs an imatrix"),
    "IQ2_M": (2.70, "2-bit i-quant mix, needs an imatrix"),
    "IQ2_S": (2.50, "2-bit i-quant, needs an imatrix"),
    "IQ2_XS": (2.31, "2-bit i-quant, needs an imatrix"),
    "IQ2_XXS": (2.06, "2-bit i-quant, needs an imatrix"),
    "Q2_0": (2.25, "2-bit, groups of 64"),
    "TQ2_0": (2.06, "ternary (for ternary-trained models)"),
    "TQ1_0": (1.69, "ternary (for ternary-trained models)"),
    "IQ1_M": (1.75, "1-bit i-quant, needs an imatrix"),
    "IQ1_S": (1.56, "1-bit i-quant, needs an imatrix"),
    "Q1_0": (1.125, "1-bit"),
    "MXFP4_MOE": (4.25, "MXFP4 for mixture-of-experts weights"),
    "NVFP4": (4.50, "4-bit NVFP4 floats"),
}

# File types whose tensors llama.cpp refuses to quantize without an importance matrix
# (llama-quant.cpp: tensor_requires_imatrix: IQ1_*, IQ2_XXS/XS/S, IQ3_XXS, and Q2_K in Q2_K_S).
NEEDS_IMATRIX = frozenset(
    {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}
)

# llama-quantize's aliases.
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


@dataclass(frozen=True)
class QuantType:
    """One llama.cpp file type: its name (`Q4_K_M`), enum value, typical bits per weight."""

    name: str
    ftype: int
    bpw: float | None
    description: str

    @property
    def needs_imatrix(self) -> bool:
        return self.name in NEEDS_IMATRIX

    @property
    def is_float(self) -> bool:
        return self.name in ("F32", "F16", "BF16")


@functools.cache
def quant_types() -> dict[str, QuantType]:
    """Every file type the installed binding exposes, by name, largest first."""
    found: dict[str, QuantType] = {}
    for name, ftype in file_types().items():
        bpw, desc = _KNOWN.get(name, (_ggml_bpw(name), ""))
        found[name] = QuantType(name, ftype, bpw, desc)
    return dict(sorted(found.items(), key=lambda kv: (-(kv[1].bpw or 0.0), kv[1].ftype)))


def _ggml_bpw(name: str) -> float | None:
    """Bits per weight of a plain ggml type of that name (for types newer than our table)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    except KeyError:
        return None
    return size * 8 / block


def get_type(name: str | QuantType) -> QuantType:
    """The QuantType called `name` (case-insensitive, llama-quantize's aliases accepted)."""
    if isinstance(name, QuantType):
        return name
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    types = quant_types()
    if key not in types:
        raise UsageError(
            f"unknown quantization type {name!r}",
            hint="`ondevice quantize --help` lists them, e.g. Q4_K_M, Q5_K_M, Q8_0",
        )
    return types[key]


def type_table() -> str:
    """The types as `--help` lists them: name, typical bits per weight, description."""
    lines = []
    for t in quant_types().values():
        bpw = f"{t.bpw:5.2f} bpw" if t.bpw is not None else "    ? bpw"
        lines.append(f"{t.name:<10} {bpw}  {t.description}".rstrip())
    return "\n".join(lines)
