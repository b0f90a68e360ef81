"""ondevice: run small language models (Phi-2 and friends) locally on llama.cpp.

    import ondevice
    with ondevice.load("demo") as model:
        for chunk in model.stream("The capital of France is", max_tokens=16):
            print(chunk.text, end="")

The runtime lives in this package; `ondevice.convert` (Hugging Face safetensors → GGUF) and
`ondevice.quantize` (llama.cpp's quantizer and quality reports) are installed beside it.

Layers. A module imports only modules of its own layer or of a layer below it, never one above,
and there are no import cycles; tests/test_layers.py reads every import (inside functions too)
and checks both against this table, which is the one place the layering is written down:

    LAYER foundation  errors paths processes settings stats results system logits watchdog
    LAYER native      _native
    LAYER model-files tensor_roles model_check gguf_header gguf_check probe policy fit chat_sandbox chat_messages chat_formats chat_tokens store locate models tune_store
    LAYER devices     backends
    LAYER runtime     constrain speculate draft tools generation batch app conversation runtime loader
    LAYER tools       bench tune pull repl quantize convert
    LAYER services    server
    LAYER interfaces  cli __main__

(`_native`, `quantize`, `convert`, `server` and `cli` are packages: their modules share the layer.)
Only `ondevice._native` imports the binding (llama_cpp) or calls ggml through ctypes.
"""

from __future__ import annotations

from pathlib import Path as _Path

# A source checkout keeps convert/ and quantize/ at the top level while the wheel installs them
# inside this package; let `ondevice.convert` import from a checkout too (python -m ondevice).
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "convert" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # type: ignore[name-defined]  # noqa: F821

from ondevice.errors import (  # noqa: E402
    ContextOverflow,
    InvalidModelFile,
    ModelNotFound,
    OndeviceError,
)

# The runtime loads llama.cpp's shared libraries when first used (a second or so); these names
# are resolved on first access so `ondevice list`, `ondevice fit`, `ondevice.convert` on a build
# server and `--help` never pay for it.
_LAZY = {
    "Chunk": "ondevice.results",
    "Result": "ondevice.results",
    "Model": "ondevice.runtime",
    "load": "ondevice.loader",
    "load_async": "ondevice.loader",
    "aload": "ondevice.loader",
    "Stats": "ondevice.stats",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ondevice' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "Chunk",
    "ContextOverflow",
    "InvalidModelFile",
    "Model",
    "ModelNotFound",
    "OndeviceError",
    "Result",
    "Stats",
    "aload",
    "load",
    "load_async",
    "__version__",
]
