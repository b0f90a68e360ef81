"""Deprecated alias of `ondevice.locate` (model name -> GGUF file), kept for old imports."""

from __future__ import annotations

import warnings

from ondevice import locate

warnings.warn("ondevice.models is now ondevice.locate", DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(locate, name)
