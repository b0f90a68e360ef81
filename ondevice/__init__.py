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

from ondevice.app import aload, load_async  # noqa: E402
from ondevice.errors import (  # noqa: E402
    ContextOverflow,
    InvalidModelFile,
    ModelNotFound,
    OndeviceError,
)
from ondevice.runtime import Chunk, Model, Result, load  # noqa: E402
from ondevice.stats import Stats  # noqa: E402

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
