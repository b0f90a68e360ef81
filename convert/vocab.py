"""The vocabulary as llama.cpp stores it, shared by the BPE (tokenizer.py) and SentencePiece
(spm.py) readers: the `Vocab` record and the small checks both make."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ondevice.errors import ConversionError


@dataclass
class Vocab:
    """A vocabulary in the form llama.cpp stores it."""

    model: str  # llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # llama.cpp's pre-tokenizer name ("default" for SentencePiece)
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos"/"eos"/"unk"/"pad" -> id
    add_bos: bool = False
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | list[dict[str, str]] | None = None
    n_real: int = 0  # tokens the tokenizer defines; the rest are padding
    # special tokens that swallow the whitespace after them (Phi-3's `rstrip`), see llama_cpp_name
    rstrip_specials: bool = False

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        setters = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for role, token_id in self.special_ids.items():
            setters[role](token_id)
        writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def check_size(n_real: int, vocab_size: int) -> None:
    if n_real > vocab_size:
        raise ConversionError(
            f"the tokenizer has {n_real} tokens but the model's embedding has only {vocab_size} rows"
        )


def added_tokens(path: Path, data: dict[str, Any] | None) -> dict[int, tuple[str, bool]]:
    """tokenizer.json's added tokens: id -> (text, special)."""
    added: dict[int, tuple[str, bool]] = {}
    for tok in (data or {}).get("added_tokens") or []:
        if not (
            isinstance(tok, dict)
            and isinstance(tok.get("id"), int)
            and tok["id"] >= 0
            and isinstance(tok.get("content"), str)
        ):
            raise ConversionError(f"{path}: invalid added token {tok!r}")
        added[tok["id"]] = (tok["content"], bool(tok.get("special")))
    return added
