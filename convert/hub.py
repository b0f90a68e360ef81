"""Where a conversion's input comes from: a local model folder, or a hub repo fetched with
huggingface-hub into its standard cache (so a second run downloads nothing and
`HF_HUB_OFFLINE=1` works).

Only the files a conversion reads are fetched: config, tokenizer (tokenizer.json or a
SentencePiece tokenizer.model, its configuration and chat template) and safetensors. Pickle
checkpoints (`pytorch_model.bin`) are never downloaded, let alone loaded.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ondevice.errors import ConversionError, DownloadError

logger = logging.getLogger(__name__)

ALLOW_PATTERNS = [
    "config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "*.safetensors",
    "model.safetensors.index.json",
]

# owner/name as the hub spells repo ids (an owner-less legacy id like "gpt2" also exists)
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def resolve_source(src: str | Path, revision: str | None = None) -> tuple[Path, str]:
    """The local folder holding the model, and a short name for it (for general.name).

    An existing path is used as is; anything else that looks like a repo id is fetched.
    """
    path = Path(src).expanduser()
    if path.exists():
        if revision is not None:
            raise ConversionError(f"--revision applies to hub repos, but {src} is a local path")
        if not path.is_dir():
            if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
                raise ConversionError(
                    f"{src} is a pickle checkpoint; ondevice reads only safetensors, because "
                    "loading a pickle can run arbitrary code"
                )
            raise ConversionError(
                f"{src} is a file; give the model folder (with config.json and the weights)"
            )
        return path, path.resolve().name
    text = str(src)
    if not _REPO_ID.match(text) or ".." in text:
        raise ConversionError(f"{src}: no such folder, and not a hub repo id like microsoft/phi-2")
    return download(text, revision), text.rsplit("/", 1)[-1]


def download(repo_id: str, revision: str | None = None) -> Path:
    """snapshot_download limited to what conversion reads; a cached snapshot is reused."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # a dependency, but say so plainly if it's missing
        raise ConversionError("huggingface-hub is needed to fetch models from the hub") from exc

    logger.info("fetching %s%s from the hub", repo_id, f"@{revision}" if revision else "")
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except GatedRepoError as exc:
        raise DownloadError(
            f"{repo_id} is gated", hint="accept its terms on the hub and log in (hf auth login)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise DownloadError(f"no hub repo {repo_id} (or it is private)") from exc
    except RevisionNotFoundError as exc:
        raise DownloadError(f"{repo_id} has no revision {revision!r}") from exc
    except LocalEntryNotFoundError as exc:
        # offline (HF_HUB_OFFLINE=1 or no network) and not in the cache
        raise DownloadError(
            f"{repo_id} is not in the local cache and the hub can't be reached",
            hint="connect once to download it, or give a local folder",
        ) from exc
    except OSError as exc:  # HfHubHTTPError and plain network/disk errors
        raise DownloadError(f"downloading {repo_id} failed: {exc}") from exc
    return Path(folder)
