"""Which of llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`) a byte-level BPE tokenizer needs.

llama.cpp does not read a tokenizer's splitting rules; it selects hand-written ones by name.
The name is found two ways, in this order:

1. llama.cpp's own way: tokenize a fixed probe string with the tokenizer (the `tokenizers`
   library, reading the model's tokenizer.json as transformers does) and look up the sha256 of
   the token ids among those of the released tokenizers llama.cpp was written against.
2. The tokenizer's own configuration: a pre-tokenizer made of exactly the pieces llama.cpp
   implements under a name (the same split regex, the same byte-level step, the same
   `ignore_merges`) is that name. This is what identifies fine-tunes with new vocabularies.

Anything else is refused with a hint to pass `--vocab-pre NAME`: a wrong guess would give a
file that loads and then tokenizes differently from the model's training.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from ondevice.errors import ConversionError

logger = logging.getLogger(__name__)

# llama.cpp's probe string (convert_hf_to_gguf.py, get_vocab_base_pre): whitespace runs, emoji
# sequences, digit runs, Khmer, CJK, Cyrillic, punctuation runs and English contractions.
PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids of PROBE)) -> name, for the tokenizers of the families ondevice converts
# (values from llama.cpp's table, which hashes the released tokenizers).
KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Emb.
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM/2
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Phi-4-mini
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# The split regexes as Hugging Face tokenizer.json files spell them.
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3_REGEX = (
    _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_REGEX = (
    _CONTRACTIONS + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
GPT4O_REGEX = (
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
    + _CONTRACTIONS
    + "?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*"
    + _CONTRACTIONS
    + "?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)

# Pre-tokenizer structure -> (llama.cpp name, the ignore_merges llama.cpp uses for it).
# ("split", REGEX): Split(Regex, Isolated) then ByteLevel without its own regex;
# ("digits",): Digits(individual) then ByteLevel with the GPT-2 regex; ("bytelevel",): GPT-2.
STRUCTURES: dict[tuple[str, ...], tuple[str, bool]] = {
    ("split", LLAMA3_REGEX): ("llama-bpe", True),
    ("split", QWEN2_REGEX): ("qwen2", False),
    ("split", GPT4O_REGEX): ("gpt-4o", False),
    ("digits",): ("smollm", False),
    ("bytelevel",): ("gpt-2", False),
}

# Slow (vocab.json + merges.txt) tokenizer classes and the regex they hard-code.
SLOW_CLASSES = {
    "GPT2Tokenizer": "gpt-2",
    "CodeGenTokenizer": "gpt-2",
    "Qwen2Tokenizer": "qwen2",
}


def identify(path: Path, data: dict[str, Any], text: str) -> str:
    """llama.cpp's pre-tokenizer name for the tokenizer.json at `path` (parsed `data`, raw
    `text`); raises ConversionError naming --vocab-pre when it can't be told."""
    by_hash = _by_hash(path, text)
    if by_hash is not None:
        logger.info("pre-tokenizer %s (the probe string's hash is a released tokenizer's)", by_hash)
        return by_hash
    signature = _signature(data.get("pre_tokenizer"))
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    found = STRUCTURES.get(signature) if signature is not None else None
    if found is not None:
        name, ignore_merges = found
        if bool(model.get("ignore_merges", False)) == ignore_merges:
            logger.info("pre-tokenizer %s (from the tokenizer's pre_tokenizer settings)", name)
            return name
    raise ConversionError(
        f"{path}: can't tell which llama.cpp pre-tokenizer this tokenizer needs (its probe "
        "hash is not a known tokenizer's and its pre_tokenizer is not one llama.cpp implements)",
        hint="if you know it, pass --vocab-pre NAME (e.g. llama-bpe, qwen2, smollm, gpt-4o, "
        "gpt-2; see llama.cpp's llama-vocab.cpp for all names)",
    )


def identify_slow(folder: Path, tok_config: dict[str, Any]) -> str:
    """The name for a vocab.json + merges.txt tokenizer, from its tokenizer class."""
    cls = tok_config.get("tokenizer_class")
    if isinstance(cls, str) and cls.removesuffix("Fast") in SLOW_CLASSES:
        return SLOW_CLASSES[cls.removesuffix("Fast")]
    raise ConversionError(
        f"{folder}: can't tell which llama.cpp pre-tokenizer the {cls or 'unnamed'} tokenizer "
        "in vocab.json / merges.txt needs",
        hint="pass --vocab-pre NAME (e.g. gpt-2, qwen2)",
    )


def probe_hash(text: str) -> str | None:
    """sha256 of the probe's token ids under this tokenizer.json, as llama.cpp computes it;
    None without the `tokenizers` library or if it can't read the file."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        logger.info("the tokenizers library is not installed; identifying by structure only")
        return None
    try:
        ids = Tokenizer.from_str(text).encode(PROBE).ids  # special tokens added, as HF does
    except Exception as exc:  # tokenizers raises plain Exception subclasses on bad files
        logger.warning("tokenizers could not load the tokenizer: %s", exc)
        return None
    return hashlib.sha256(str(ids).encode()).hexdigest()


def _by_hash(path: Path, text: str) -> str | None:
    digest = probe_hash(text)
    logger.debug("%s: probe hash %s", path, digest)
    return KNOWN_HASHES.get(digest) if digest else None


def _signature(pre: object) -> tuple[str, ...] | None:
    """The structure of a tokenizer.json pre_tokenizer, in the terms of STRUCTURES."""
    parts = _flatten(pre)
    if not parts or not _byte_level(parts[-1]):
        return None
    last_regex = parts[-1].get("use_regex", True)
    if len(parts) == 1:
        return ("bytelevel",) if last_regex else None
    if len(parts) != 2:
        return None
    first = parts[0]
    if first.get("type") == "Digits" and first.get("individual_digits") and last_regex:
        return ("digits",)
    pattern = first.get("pattern") if isinstance(first.get("pattern"), dict) else {}
    if (
        first.get("type") == "Split"
        and isinstance(pattern.get("Regex"), str)
        and first.get("behavior") == "Isolated"
        and not first.get("invert", False)
        and not last_regex
    ):
        return ("split", pattern["Regex"])
    return None


def _flatten(pre: object) -> list[dict[str, Any]]:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for part in pre.get("pretokenizers") or []:
            out.extend(_flatten(part) or [{"type": "?"}])
        return out
    return [pre]


def _byte_level(part: dict[str, Any]) -> bool:
    return part.get("type") == "ByteLevel" and not part.get("add_prefix_space", False)


def is_byte_level(data: dict[str, Any]) -> bool:
    """Whether a tokenizer.json is a byte-level BPE (GPT-2 family), the `gpt2` model of llama.cpp."""
    model = data.get("model")
    parts = _flatten(data.get("pre_tokenizer"))
    return (
        isinstance(model, dict)
        and model.get("type") == "BPE"
        and not model.get("byte_fallback", False)
        and bool(parts)
        and parts[-1].get("type") == "ByteLevel"
    )
