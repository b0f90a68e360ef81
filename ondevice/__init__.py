"""ondevice: run small language models (Phi-2 and friends) locally on llama.cpp.

    import ondevice
    with ondevice.load("demo") as model:
        for chunk in model.stream("The capital of France is", max_tokens=16):
            print(chunk.text, end="")

The runtime lives in this package; `ondevice.convert` (Hugging Face safetensors → GGUF) and
`ondevice.quantize` (llama.cpp's quantizer and quality reports) are installed beside it.
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

# The runtime imports llama.cpp's shared libraries (a second or so); load it on first use so
# `ondevice list`, `ondevice.convert` on a build server and `--help` stay fast.
_LAZY = {
    "Chunk": "ondevice.runtime",
    "Model": "ondevice.runtime",
    "Result": "ondevice.runtime",
    "load": "ondevice.runtime",
    "Stats": "ondevice.stats",
    "aload": "ondevice.app",
    "load_async": "ondevice.app",
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
