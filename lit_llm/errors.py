"""Exceptions raised for user mistakes.

Every message names the offending key, value or path and says how to fix it.
"""

from __future__ import annotations

import os


class LitLLMError(Exception):
    """Base class of every error lit_llm raises for a user mistake."""


class ConfigError(LitLLMError, ValueError):
    """A configuration value is missing, unknown or inconsistent."""


class DataError(LitLLMError, ValueError):
    """A data source is missing, empty, malformed or too small."""


class CheckpointError(LitLLMError):
    """A checkpoint or weights file is missing, corrupt or does not match the model."""


class NonFiniteLossError(LitLLMError, RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


class UsageError(LitLLMError):
    """A command-line flag that the parser refused (unknown, abbreviated or malformed): exit status 2."""


def debugging() -> bool:
    """``LIT_LLM_DEBUG`` is set: entry points re-raise user errors with their traceback instead of one line."""
    return bool(os.environ.get("LIT_LLM_DEBUG"))


def find_user_error(error: BaseException | None) -> LitLLMError | None:
    """The :class:`LitLLMError` that ``error`` is or wraps (jsonargparse wraps errors raised by constructors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LitLLMError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def one_line(error: BaseException) -> str:
    """``"Invalid X:\\n  - a\\n  - b"`` -> ``"Invalid X: a; b"``: an error's message as one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    return lines[0] + " " + "; ".join(line.removeprefix("- ") for line in lines[1:])


class StorageError(LitLLMError, OSError):
    """A file or folder cannot be written: a full disk, a read-only or unwritable folder, a file where a folder
    belongs."""
