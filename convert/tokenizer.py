"""Byte-level BPE tokenizers (GPT-2 / CodeGen style) read from a Hugging Face folder and written
as llama.cpp's `gpt2` tokenizer.

Reads tokenizer.json, or vocab.json + merges.txt (+ added_tokens.json), with plain json: no
`transformers` or `tokenizers` needed at conversion time. The vocabulary is padded with unused
`[PADn]` entries up to the model's embedding size, as llama.cpp's own converter does, so token
ids and embedding rows line up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ondevice.errors import ConversionError

logger = logging.getLogger(__name__)


@dataclass
class BPEVocab:
    """A byte-level BPE vocabulary in the form llama.cpp's gpt2 tokenizer stores it."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos"/"eos"/"unk"/"pad" -> id
    n_real: int = 0  # tokens the tokenizer defines; the rest are padding

    def write(self, writer: gguf.GGUFWriter, *, pre: str, add_bos: bool) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        setters = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for role, token_id in self.special_ids.items():
            setters[role](token_id)
        writer.add_add_bos_token(add_bos)


def load_bpe_vocab(folder: Path, vocab_size: int, config: dict[str, Any]) -> BPEVocab:
    """Read the folder's byte-level BPE tokenizer, padded to `vocab_size` entries."""
    tok_json = folder / "tokenizer.json"
    if tok_json.is_file():
        vocab, merges, added = _from_tokenizer_json(tok_json)
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab, merges, added = _from_vocab_merges(folder)
    else:
        raise ConversionError(
            f"{folder} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
        )
    tok_config = _read_json(folder / "tokenizer_config.json") or {}
    for token_id, info in (tok_config.get("added_tokens_decoder") or {}).items():
        if isinstance(info, dict) and isinstance(info.get("content"), str):
            added.setdefault(int(token_id), (info["content"], bool(info.get("special"))))

    n_real = 1 + max([*vocab.values(), *added.keys()], default=-1)
    if n_real > vocab_size:
        raise ConversionError(
            f"the tokenizer has {n_real} tokens but the model's embedding has only {vocab_size} rows"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in vocab.items():
        tokens[token_id] = text
        types[token_id] = gguf.TokenType.NORMAL

    # Added tokens are matched as whole strings before BPE (by HF and by llama.cpp alike).
    # Special ones (<|endoftext|>) become CONTROL, parsed only when asked; the rest (CodeGen's
    # runs of spaces and tabs) USER_DEFINED, always matched, stored as their literal text.
    specials = _special_token_strings(folder, tok_config)
    for token_id, (content, special) in sorted(added.items()):
        tokens[token_id] = content
        is_control = special or content in specials.values()
        types[token_id] = gguf.TokenType.CONTROL if is_control else gguf.TokenType.USER_DEFINED

    ids = {text: i for i, text in enumerate(tokens[:n_real])}
    special_ids: dict[str, int] = {}
    for role, content in specials.items():
        if content in ids:
            special_ids[role] = ids[content]
        else:
            logger.warning("%s token %r is not in the vocabulary; not recorded", role, content)
    for role in ("bos", "eos"):
        # the model config's ids are the fallback when the tokenizer files don't name them
        cfg_id = config.get(f"{role}_token_id")
        if role not in special_ids and isinstance(cfg_id, int) and 0 <= cfg_id < vocab_size:
            special_ids[role] = cfg_id
    logger.info("tokenizer: %d tokens, %d merges, padded to %d", n_real, len(merges), vocab_size)
    return BPEVocab(tokens, [int(t) for t in types], merges, special_ids, n_real)


def _from_tokenizer_json(
    path: Path,
) -> tuple[dict[str, int], list[str], dict[int, tuple[str, bool]]]:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ConversionError(
            f"{path}: not a BPE tokenizer (model.type {model and model.get('type')!r})"
        )
    if data.get("normalizer") is not None:
        raise ConversionError(
            f"{path}: has a normalizer, which llama.cpp's gpt2 tokenizer does not apply"
        )
    if not _is_byte_level(data.get("pre_tokenizer")):
        raise ConversionError(
            f"{path}: the pre-tokenizer is not GPT-2 byte-level (ByteLevel with the GPT-2 regex, "
            "no prefix space)"
        )
    vocab = _check_vocab(path, model.get("vocab"))
    merges = []
    for merge in model.get("merges") or []:
        # tokenizers < 0.20 wrote "a b"; newer versions write ["a", "b"]
        if isinstance(merge, str):
            merges.append(merge)
        elif isinstance(merge, list) and len(merge) == 2 and all(isinstance(m, str) for m in merge):
            merges.append(f"{merge[0]} {merge[1]}")
        else:
            raise ConversionError(f"{path}: invalid merge {merge!r}")
    added: dict[int, tuple[str, bool]] = {}
    for tok in data.get("added_tokens") or []:
        if not (
            isinstance(tok, dict)
            and isinstance(tok.get("id"), int)
            and isinstance(tok.get("content"), str)
        ):
            raise ConversionError(f"{path}: invalid added token {tok!r}")
        added[tok["id"]] = (tok["content"], bool(tok.get("special")))
    return vocab, merges, added


def _from_vocab_merges(
    folder: Path,
) -> tuple[dict[str, int], list[str], dict[int, tuple[str, bool]]]:
    vocab = _check_vocab(folder / "vocab.json", _read_json(folder / "vocab.json"))
    try:
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{folder / 'merges.txt'}: can't read: {exc}") from None
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    added: dict[int, tuple[str, bool]] = {}
    for content, token_id in (_read_json(folder / "added_tokens.json") or {}).items():
        if isinstance(token_id, int):
            added[token_id] = (content, False)  # specialness comes from tokenizer_config.json
    return vocab, merges, added


def _check_vocab(path: Path, vocab: object) -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise ConversionError(f"{path}: no vocabulary")
    seen: set[int] = set()
    for text, token_id in vocab.items():
        if not isinstance(token_id, int) or token_id < 0 or token_id in seen:
            raise ConversionError(
                f"{path}: invalid or duplicate id {token_id!r} for token {text!r}"
            )
        seen.add(token_id)
    return vocab


def _is_byte_level(pre: object) -> bool:
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        return len(parts) == 1 and _is_byte_level(parts[0])
    return (
        pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and pre.get("use_regex", True)
    )


def _special_token_strings(folder: Path, tok_config: dict[str, Any]) -> dict[str, str]:
    """bos/eos/unk/pad token strings from tokenizer_config.json or special_tokens_map.json."""
    sources = [tok_config, _read_json(folder / "special_tokens_map.json") or {}]
    out: dict[str, str] = {}
    for role in ("bos", "eos", "unk", "pad"):
        for source in sources:
            value = source.get(f"{role}_token")
            if isinstance(value, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str) and value:
                out[role] = value
                break
    return out


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: can't read: {exc}") from None
