"""Hugging Face safetensors checkpoints → GGUF, streaming, checked and atomic.

    from ondevice.convert import convert
    convert("microsoft/phi-2", "phi-2-f16.gguf", outtype="f16")

Imports nothing of ondevice's runtime (a build server converting models needs no model loaded),
only `ondevice.errors` for the typed `ConversionError`. Architectures register themselves by
their Hugging Face `architectures` name; `SUPPORTED` lists them.
"""

from __future__ import annotations

import os
from pathlib import Path

# each module registers its architectures by their Hugging Face names
from ondevice.convert import llama as _llama  # noqa: F401  (LlamaForCausalLM, MistralForCausalLM)
from ondevice.convert import phi2 as _phi2  # noqa: F401  (PhiForCausalLM)
from ondevice.convert import phi3 as _phi3  # noqa: F401  (Phi3ForCausalLM)
from ondevice.convert import qwen2 as _qwen2  # noqa: F401  (Qwen2ForCausalLM)
from ondevice.convert.base import (
    OUTTYPES,
    SUPPORTED,
    Architecture,
    HParams,
    check_output_path,
    check_outtype,
    register,
)
from ondevice.convert.base import convert_folder as _convert_folder
from ondevice.convert.hub import resolve_source

__all__ = ["OUTTYPES", "SUPPORTED", "Architecture", "HParams", "convert", "register"]


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    outtype: str = "f16",
    revision: str | None = None,
    force: bool = False,
    progress: bool | None = None,
    vocab_pre: str | None = None,
) -> Path:
    """Convert a model folder or hub repo id to a GGUF file at `out`; returns `out`.

    `outtype` is f32, f16, bf16 or q8_0 (matrices; norms and biases stay f32). `out` appears
    only when the conversion succeeded; an existing `out` is replaced only with `force`.
    `progress` shows a bar on stderr (None: only when stderr is a terminal). `vocab_pre`
    names llama.cpp's pre-tokenizer for a byte-level BPE tokenizer that can't be identified.
    Raises `ondevice.errors.ConversionError` (or `DownloadError`) on any problem.
    """
    out_path = Path(out).expanduser()
    check_outtype(outtype)  # both checks before a possibly long download
    check_output_path(out_path, force)
    folder, name = resolve_source(src, revision)
    return _convert_folder(
        folder,
        out_path,
        outtype=outtype,
        name=name,
        force=force,
        progress=progress,
        vocab_pre=vocab_pre,
    )
