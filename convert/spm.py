"""SentencePiece tokenizers (tokenizer.model: Llama 2, Mistral, TinyLlama, Phi-3) as llama.cpp's
`llama` vocabulary: the pieces, scores and types from the sentencepiece library (through
gguf-py's `SentencePieceVocab`), then the added tokens of tokenizer.json and
tokenizer_config.json on top, as llama.cpp's own converter lays them out.

llama.cpp tokenizes these like sentencepiece itself does (a space is put before the text and
after every special token). transformers 5 rebuilds Llama tokenizers with `Metaspace`
pre-tokenization, which adds no space before text that already starts with one; the token ids
differ there, and nowhere else (tests/test_convert_families.py shows both).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
from ondevice.convert.vocab import Vocab, added_tokens, check_size

from ondevice.errors import ConversionError

logger = logging.getLogger(__name__)

T = gguf.TokenType
# Specials llama.cpp never strips after, even under its Phi-3 rule (see llama_cpp_name).
_NOT_RSTRIPPED = {"<unk>", "<s>", "<|endoftext|>", "</s>"}


def load_spm_vocab(
    folder: Path, vocab_size: int, tok_json: dict[str, Any] | None, tok_config: dict[str, Any]
) -> Vocab:
    """The tokenizer.model in `folder`, with the added tokens, padded to `vocab_size`."""
    path = folder / "tokenizer.model"
    base = _sentencepiece(path)
    processor = base.sentencepiece_tokenizer
    pieces = list(base.sentencepiece_tokens())
    check_size(len(pieces), vocab_size)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    for i, (text, score, kind) in enumerate(pieces):
        tokens[i], scores[i], types[i] = text.decode("utf-8"), float(score), int(kind)

    # id -> (text, special, rstrip): added_tokens.json, then tokenizer_config.json's decoder,
    # then tokenizer.json (what transformers itself loads last)
    added: dict[int, tuple[str, bool, bool]] = {}
    for text, token_id in base.added_tokens_dict.items():
        if isinstance(token_id, int) and token_id >= 0:
            added[token_id] = (text, False, False)
    for key, info in (tok_config.get("added_tokens_decoder") or {}).items():
        if isinstance(info, dict) and isinstance(info.get("content"), str) and key.isdigit():
            added[int(key)] = (info["content"], bool(info.get("special")), bool(info.get("rstrip")))
    flags = {
        tok["id"]: bool(tok.get("rstrip"))
        for tok in (tok_json or {}).get("added_tokens") or []
        if isinstance(tok, dict) and isinstance(tok.get("id"), int)
    }
    for token_id, (text, special) in added_tokens(folder / "tokenizer.json", tok_json).items():
        added[token_id] = (text, special, flags.get(token_id, False))

    n_real = max(len(pieces), 1 + max(added, default=-1))
    check_size(n_real, vocab_size)
    rstrip: dict[str, bool] = {}
    for token_id, (text, special, strip) in sorted(added.items()):
        if token_id < len(pieces) and tokens[token_id] == text and types[token_id] != T.NORMAL:
            continue  # <unk>, <s>, </s> restated: sentencepiece's own type stays
        tokens[token_id] = text if special else text.replace("\u2581", " ")
        scores[token_id] = -1000.0
        types[token_id] = int(T.CONTROL if special else T.USER_DEFINED)
        if special:
            rstrip[text] = strip
    vocab = Vocab("llama", "default", tokens, types, scores=scores, n_real=n_real)
    vocab.rstrip_specials = _phi3_style(rstrip)
    vocab.add_space_prefix = _space_prefix(processor, tok_config)
    return vocab


def _sentencepiece(path: Path) -> Any:
    try:
        import sentencepiece  # noqa: F401  (gguf.vocab imports it quietly and sets None)
    except ImportError:
        raise ConversionError(
            f"{path} is a SentencePiece tokenizer; reading it needs the sentencepiece library",
            hint="pip install 'ondevice[convert]' (or: pip install sentencepiece)",
        ) from None
    try:
        vocab = gguf.SentencePieceVocab(path.parent)
    except (OSError, RuntimeError) as exc:  # sentencepiece: "could not parse ModelProto"
        raise ConversionError(f"{path}: not a SentencePiece model ({exc})") from None
    except ValueError as exc:  # added_tokens.json with ids that leave gaps
        raise ConversionError(f"{path.parent / 'added_tokens.json'}: {exc}") from None
    return vocab


def _phi3_style(rstrip: dict[str, bool]) -> bool:
    """Whether the special tokens strip the whitespace after them the way llama.cpp's Phi-3
    rule does: all of them, except the four it leaves alone."""
    stripping = {t for t, s in rstrip.items() if s and t not in _NOT_RSTRIPPED}
    others = {t for t in rstrip if t not in _NOT_RSTRIPPED}
    if stripping and stripping != others:
        logger.warning(
            "only some special tokens strip the whitespace after them (%s); llama.cpp can't "
            "do that, so text around the others will tokenize differently",
            ", ".join(sorted(stripping)[:4]),
        )
        return False
    return bool(stripping)


def _space_prefix(processor: Any, tok_config: dict[str, Any]) -> bool:
    """Whether a space is put before the text (sentencepiece's add_dummy_prefix), as the
    tokenizer config states it, else as the model behaves."""
    configured = tok_config.get("add_prefix_space")
    if isinstance(configured, bool):
        return configured
    if processor.decode(processor.encode("a  b")) != "a  b":
        logger.warning(
            "this SentencePiece model collapses runs of spaces, which llama.cpp does not do"
        )
    first = processor.encode("a", out_type=str)
    return bool(first) and first[0].startswith("\u2581")
