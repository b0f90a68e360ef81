"""ondevice.quantize: llama.cpp's quantizer run safely, and quality reports per quant type.

    from ondevice.quantize import quantize, evaluate, quality_ladder
    quantize("model-f16.gguf", "model-q4_k_m.gguf", "Q4_K_M")
    evaluate("model-q4_k_m.gguf", text, ctx=512, reference="model-f16.gguf")

quantize() runs the engine's own `llama_model_quantize` in a child process (an abort in llama.cpp
can't take the caller down); evaluate() measures perplexity the way llama-perplexity does, plus
the KL divergence and top-1 agreement against a reference model; quality_ladder() does both for
a list of types. This package needs no loaded model for quantizing; the quality functions load
models through ondevice.load().
"""

from __future__ import annotations

from .dequantize import dequantize_to_f16
from .quality import QualityResult, ReferenceLogits, evaluate, read_text
from .quantize import QuantizeResult, estimate_bytes, quantize
from .report import LadderReport, LadderRow, plot_ladder, quality_ladder
from .types import QuantType, get_type, quant_types, type_table

__all__ = [
    "LadderReport",
    "LadderRow",
    "QualityResult",
    "QuantType",
    "QuantizeResult",
    "ReferenceLogits",
    "dequantize_to_f16",
    "estimate_bytes",
    "evaluate",
    "get_type",
    "plot_ladder",
    "quality_ladder",
    "quant_types",
    "quantize",
    "read_text",
    "type_table",
]
