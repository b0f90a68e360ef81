"""Tokenizers read from a Hugging Face folder and written as llama.cpp's vocabulary.

Two kinds are converted:
- byte-level BPE (GPT-2, CodeGen/Phi-2, Llama 3, Qwen2, SmolLM, Phi-4-mini): tokenizer.json,
  or vocab.json + merges.txt (+ added_tokens.json), as llama.cpp's `gpt2` model, with the
  pre-tokenizer name llama.cpp needs (see `pretokenizer`);
- SentencePiece (Llama 2, Mistral, TinyLlama, Phi-3): tokenizer.model, as llama.cpp's `llama`
  model (see `spm`; needs the sentencepiece library).
Added and special tokens, BOS/EOS/UNK/PAD ids, `add_bos_token` and the chat template (from
tokenizer_config.json or chat_template.jinja, through gguf-py's `SpecialVocab`) go with it. The
vocabulary is padded with unused `[PADn]` entries up to the model's embedding size, as
llama.cpp's own converter does, so token ids and embedding rows line up.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
from ondevice.convert import pretokenizer, spm
from ondevice.convert.vocab import Vocab, added_tokens, check_size

from ondevice.errors import ConversionError

logger = logging.getLogger(__name__)

# Tokens llama.cpp looks up by text when a model's name says Phi-3 (it fails to load without).
PHI3_RULE_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)


def load_vocab(
    folder: Path,
    vocab_size: int,
    config: dict[str, Any],
    *,
    pre: str | None = None,
    pre_names: Mapping[str, str] | None = None,
    add_bos: bool | None = None,
) -> Vocab:
    """Read the folder's tokenizer, padded to `vocab_size` entries.

    `pre` names llama.cpp's pre-tokenizer for a BPE tokenizer (None: identify it, then rename
    it through `pre_names`); `add_bos` overrides what the tokenizer's configuration says.
    """
    rename = pre_names or {}
    tok_config = read_json(folder / "tokenizer_config.json") or {}
    if not isinstance(tok_config, dict):
        raise ConversionError(f"{folder / 'tokenizer_config.json'}: not a JSON object")
    tok_json = folder / "tokenizer.json"
    text, data = _read_tokenizer_json(tok_json)
    if data is not None and pretokenizer.is_byte_level(data):
        tokens, merges, added = _from_tokenizer_json(tok_json, data)
        vocab = _bpe(folder, tokens, merges, added, vocab_size, tok_config)
        found = pre or pretokenizer.identify(tok_json, data, text or "")
        vocab.pre = found if pre else rename.get(found, found)
    elif (folder / "tokenizer.model").is_file():
        vocab = spm.load_spm_vocab(folder, vocab_size, data, tok_config)
    elif data is not None:
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            raise ConversionError(
                f"{tok_json}: a SentencePiece-style tokenizer, but the folder has no "
                "tokenizer.model; ondevice reads SentencePiece vocabularies from tokenizer.model"
            )
        raise ConversionError(
            f"{tok_json}: a {model.get('type') or 'unknown'} tokenizer; ondevice converts "
            "byte-level BPE (tokenizer.json) and SentencePiece (tokenizer.model) tokenizers"
        )
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokens, merges, added = _from_vocab_merges(folder)
        vocab = _bpe(folder, tokens, merges, added, vocab_size, tok_config)
        found = pre or pretokenizer.identify_slow(folder, tok_config)
        vocab.pre = found if pre else rename.get(found, found)
    else:
        raise ConversionError(
            f"{folder} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json and "
            "merges.txt)"
        )
    _add_specials(vocab, folder, config, tok_config, add_bos)
    logger.info(
        "tokenizer: %s/%s, %d tokens, %d merges, padded to %d",
        vocab.model,
        vocab.pre,
        vocab.n_real,
        len(vocab.merges),
        vocab_size,
    )
    return vocab


def llama_cpp_name(name: str, vocab: Vocab) -> str:
    """`general.name` adjusted for the one place llama.cpp reads it: a name containing "phi3"
    or "phi-3" makes it strip the whitespace after every special token (except <unk>, <s> and
    <|endoftext|>), as Phi-3's tokenizer does, and look those tokens up by text.

    So a Phi-3-style tokenizer gets the marker in its name, and any other tokenizer loses it.
    """
    triggered = _PHI3_NAME.search(name) is not None
    texts = set(vocab.tokens[: vocab.n_real])
    usable = vocab.rstrip_specials and all(t in texts for t in PHI3_RULE_TOKENS)
    if usable and not triggered:
        logger.info("naming the model %r so llama.cpp applies Phi-3's special-token rule", name)
        return f"{name} (phi3)"
    if triggered and not usable:
        renamed = _PHI3_NAME.sub(lambda m: m.group(0).replace("-", "")[:-1] + " 3", name)
        logger.warning(
            "general.name %r would make llama.cpp treat the tokenizer as Phi-3's; writing %r",
            name,
            renamed,
        )
        return renamed
    return name


# -- byte-level BPE --------------------------------------------------------------------------


def _bpe(
    folder: Path,
    vocab: dict[str, int],
    merges: list[str],
    added: dict[int, tuple[str, bool]],
    vocab_size: int,
    tok_config: dict[str, Any],
) -> Vocab:
    for token_id, info in (tok_config.get("added_tokens_decoder") or {}).items():
        if isinstance(info, dict) and isinstance(info.get("content"), str):
            added.setdefault(int(token_id), (info["content"], bool(info.get("special"))))

    n_real = 1 + max([*vocab.values(), *added.keys()], default=-1)
    check_size(n_real, vocab_size)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, token_id in vocab.items():
        tokens[token_id] = text
        types[token_id] = gguf.TokenType.NORMAL

    # Added tokens are matched as whole strings before BPE (by HF and by llama.cpp alike).
    # Special ones (<|endoftext|>) become CONTROL, parsed only when asked; the rest (CodeGen's
    # runs of spaces and tabs) USER_DEFINED, always matched, stored as their literal text.
    specials = set(special_token_strings(folder, tok_config).values())
    for token_id, (content, special) in sorted(added.items()):
        tokens[token_id] = content
        is_control = special or content in specials
        types[token_id] = gguf.TokenType.CONTROL if is_control else gguf.TokenType.USER_DEFINED
    return Vocab("gpt2", "", tokens, [int(t) for t in types], merges=merges, n_real=n_real)


def _read_tokenizer_json(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    if not path.is_file():
        return None, None
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: can't read: {exc}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return text, data


def _from_tokenizer_json(
    path: Path, data: dict[str, Any]
) -> tuple[dict[str, int], list[str], dict[int, tuple[str, bool]]]:
    model = data["model"]
    normalizer = data.get("normalizer")
    if normalizer is not None:
        kind = normalizer.get("type") if isinstance(normalizer, dict) else None
        if kind != "NFC":
            raise ConversionError(
                f"{path}: has a {kind or 'malformed'} normalizer, which llama.cpp's byte-level "
                "BPE does not apply"
            )
        # Qwen2's: llama.cpp skips it, which only matters for text not already in NFC
        logger.info("%s: NFC normalizer (llama.cpp leaves text as it is)", path.name)
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
    return vocab, merges, added_tokens(path, data)


def _from_vocab_merges(
    folder: Path,
) -> tuple[dict[str, int], list[str], dict[int, tuple[str, bool]]]:
    vocab = _check_vocab(folder / "vocab.json", read_json(folder / "vocab.json"))
    try:
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{folder / 'merges.txt'}: can't read: {exc}") from None
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    added: dict[int, tuple[str, bool]] = {}
    for content, token_id in (read_json(folder / "added_tokens.json") or {}).items():
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


# -- special tokens, BOS, chat template ------------------------------------------------------


def _add_specials(
    vocab: Vocab,
    folder: Path,
    config: dict[str, Any],
    tok_config: dict[str, Any],
    add_bos: bool | None,
) -> None:
    """Special token ids, add_bos/add_eos and the chat template, from the tokenizer's files
    (gguf-py's SpecialVocab reads what transformers reads) with the model config as fallback."""
    try:
        sv = gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(vocab.tokens))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConversionError(
            f"{folder}: can't read the tokenizer's special tokens: {exc}"
        ) from None
    ids = {text: i for i, text in enumerate(vocab.tokens[: vocab.n_real])}
    for role, content in special_token_strings(folder, tok_config).items():
        if content in ids:
            vocab.special_ids[role] = ids[content]
        else:
            logger.warning("%s token %r is not in the vocabulary; not recorded", role, content)
    for role in ("bos", "eos", "unk", "pad"):
        if role not in vocab.special_ids and role in sv.special_token_ids:
            vocab.special_ids[role] = sv.special_token_ids[role]
    for role in ("bos", "eos"):
        # the model config's ids are the fallback when the tokenizer files don't name them
        cfg_id = config.get(f"{role}_token_id")
        if role not in vocab.special_ids and isinstance(cfg_id, int) and 0 <= cfg_id < len(ids):
            vocab.special_ids[role] = cfg_id
    if add_bos is None:
        # SentencePiece models (and transformers' Llama tokenizer) add BOS unless told not to
        add_bos = sv.add_special_token.get("bos", vocab.model == "llama")
    vocab.add_bos = bool(add_bos)
    if "eos" in sv.add_special_token:
        vocab.add_eos = bool(sv.add_special_token["eos"])
    if vocab.add_bos and "bos" not in vocab.special_ids:
        raise ConversionError(
            f"{folder}: the tokenizer adds a BOS token but names none (bos_token in "
            "tokenizer_config.json or bos_token_id in config.json)"
        )
    template = sv.chat_template
    if isinstance(template, str) and template.strip() or isinstance(template, list) and template:
        vocab.chat_template = template


def special_token_strings(folder: Path, tok_config: dict[str, Any]) -> dict[str, str]:
    """bos/eos/unk/pad token strings from tokenizer_config.json or special_tokens_map.json."""
    sources = [tok_config, read_json(folder / "special_tokens_map.json") or {}]
    out: dict[str, str] = {}
    for role in ("bos", "eos", "unk", "pad"):
        for source in sources:
            value = source.get(f"{role}_token") if isinstance(source, dict) else None
            if isinstance(value, dict):  # {"content": "<|endoftext|>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str) and value:
                out[role] = value
                break
    return out


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path}: can't read: {exc}") from None
