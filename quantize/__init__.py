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
from .quantize import QuantizeResult, estimate_bytes, quantize
from .types import QuantType, get_type, quant_types, type_table

# The quality functions are resolved on first use: the quantizer's worker process imports this
# package, and must not import the runtime they need.
_LAZY = {
    "QualityResult": "quality",
    "ReferenceLogits": "quality",
    "evaluate": "quality",
    "read_text": "quality",
    "LadderReport": "report",
    "LadderRow": "report",
    "plot_ladder": "report",
    "quality_ladder": "report",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ondevice.quantize' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


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
