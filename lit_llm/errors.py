"""Exceptions raised for user mistakes.

Every message names the offending key, value or path and says how to fix it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


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
    """A command-line flag that argparse refused."""


class CommandLineParser(argparse.ArgumentParser):
    """The ``ArgumentParser`` of lit_llm's commands: a mistake raises :class:`UsageError`, which the command prints as
    one line with exit status 1 (argparse itself would print the whole usage and exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


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


def run_command(action: Callable[[], object], errors: tuple[type[BaseException], ...] = (LitLLMError, OSError),
                single_line: bool = False) -> int:
    """Run a command-line tool's ``action`` and return its exit status: 0 when it returns; 1 after one ``error:`` line
    on stderr when it raises one of ``errors`` (a user mistake; ``LIT_LLM_DEBUG=1`` re-raises it instead); 130 on
    Ctrl-C."""
    try:
        action()
    except errors as err:
        if debugging():
            raise
        print(f"error: {one_line(err) if single_line else err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def exit_with_error(error: BaseException) -> None:
    """Print ``error: <Type>: <message>`` on stderr and exit with status 1: how every entry point ends on bad input."""
    print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(1)
