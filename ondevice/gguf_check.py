"""Deprecated alias of `ondevice.gguf_header` (the GGUF header reader), kept for old imports."""

from __future__ import annotations

import warnings

from ondevice import gguf_header

warnings.warn("ondevice.gguf_check is now ondevice.gguf_header", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(gguf_header, name)
