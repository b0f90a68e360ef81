"""Typed errors of the ondevice library: the library raises them, only the CLI prints them.

Every error carries a one-line message that names the problem and, where there is one, the fix
(`hint`), so the CLI can print `error: <message>` without a traceback.
"""

from __future__ import annotations


class OndeviceError(Exception):
    """Base class of every error ondevice raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)

    def one_line(self) -> str:
        """The message as the CLI prints it: problem first, then the fix."""
        text = self.message if not self.hint else f"{self.message}; {self.hint}"
        return " ".join(text.split())


class ModelNotFound(OndeviceError):
    """The model name or path names nothing we can load."""


class MissingExtra(OndeviceError):
    """An optional part of ondevice is needed but not installed."""


class InvalidModelFile(OndeviceError):
    """A file is not a well-formed GGUF model; raised before llama.cpp sees the file."""

    def __init__(
        self,
        path: str,
        message: str,
        *,
        offset: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = path
        self.offset = offset
        self.field = field
        where = []
        if field is not None:
            where.append(f"field {field}")
        if offset is not None:
            where.append(f"offset {offset}")
        loc = f" ({', '.join(where)})" if where else ""
        super().__init__(f"{path}: invalid GGUF file{loc}: {message}", hint=hint)


class ModelLoadError(OndeviceError):
    """llama.cpp refused to load a file that passed our checks."""


class LoadCancelled(ModelLoadError):
    """The load was cancelled from its progress callback."""


class BackendUnavailable(OndeviceError):
    """The requested compute backend is not compiled into the installed llama.cpp."""


class DoesNotFit(OndeviceError):
    """The model at this context would not fit the memory available."""


class ContextOverflow(OndeviceError):
    """A prompt (or a single chat message) is longer than the context window."""


class GenerationError(OndeviceError):
    """llama.cpp failed while evaluating a batch."""


class IncompleteOutput(OndeviceError):
    """A constrained reply was cut short (max_tokens or cancelled), so it is not complete."""


class ChatFormatError(OndeviceError):
    """No usable prompt format for a conversation, or a chat template that misbehaves."""


class ModelClosed(OndeviceError):
    """The Model was used after close()."""


class ConversionError(OndeviceError):
    """A checkpoint can't be converted to GGUF."""


class QuantizeError(OndeviceError):
    """llama.cpp's quantizer failed, or its inputs were refused before starting."""


class DownloadError(OndeviceError):
    """A download from the hub failed or didn't match what the hub promised."""


class UsageError(OndeviceError):
    """An argument combination that makes no sense (the CLI exits with 2)."""

    exit_code = 2


class Cancelled(OndeviceError):
    """A background job (a load started with `ondevice.load_async`) was cancelled."""
