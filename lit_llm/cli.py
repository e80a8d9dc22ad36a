"""What every lit_llm command shares: one argument parser, one error printer, one exit-code convention.

Every command (``train``, ``generate``, ``classify``, ``convert``, ``judge``, ...) is a thin module over this one:

- :class:`CommandParser`: ``argparse`` without prefix matching (``--max-new-token`` is refused, not taken for
  ``--max-new-tokens``); a usage mistake raises :class:`~lit_llm.errors.UsageError`.
- :func:`run_command`: runs a command's action and turns what it raises into one ``error: <Type>: <message>`` line
  on stderr and an exit status: **0** done, **1** an error (a user mistake: bad file, bad value, bad checkpoint),
  **2** a usage mistake (an unknown or malformed flag), **130** Ctrl-C. ``LIT_LLM_DEBUG=1`` re-raises instead, with
  the traceback.
- :func:`print_error` / :func:`warn`: the one way a command reports an error or a warning.
- Input helpers several commands need: :func:`resolve_device`, :func:`read_text_file`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

from lit_llm.diagnose import diagnose
from lit_llm.errors import ConfigError, LitLLMError, UsageError, debugging, one_line

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CommandParser(argparse.ArgumentParser):
    """The ``ArgumentParser`` of lit_llm's commands: no abbreviated flags, and a mistake raises :class:`UsageError`
    (printed as one line, exit status 2) instead of argparse's usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def error_line(error: BaseException) -> str:
    """``error: <Type>: <message on one line>``: how every command reports an error."""
    return f"error: {type(error).__name__}: {one_line(error)}"


def print_error(error: BaseException) -> None:
    """Print :func:`error_line` of ``error`` on stderr."""
    print(error_line(error), file=sys.stderr)


def warn(message: str) -> None:
    """Print ``warning: <message>`` on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def entry_point(main: Callable[[], int | None]) -> NoReturn:
    """What ``python -m lit_llm.<command>`` runs: Python warnings shown as one ``warning:`` line each (a terminal user
    needs the warning, not the source line that raised it), then exit with ``main()``'s status."""
    warnings.showwarning = lambda message, *args, **kwargs: warn(str(message))
    sys.exit(main())


def run_command(action: Callable[[], object],
                errors: tuple[type[BaseException], ...] = (LitLLMError, OSError)) -> int:
    """Run a command's ``action`` and return its exit status (see the module docstring).

    Args:
        action: The command's work.
        errors: What counts as a user mistake (printed as one line); anything else is a bug and keeps its traceback.
    """
    try:
        action()
    except UsageError as err:
        if debugging():
            raise
        print_error(err)
        return EXIT_USAGE
    except errors as err:
        if debugging():
            raise
        print_error(diagnose(err) or err)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a fault diagnose() knows (full disk, Lightning's configuration errors, ...) or a bug
        known = diagnose(err)
        if known is None or debugging():
            raise
        print_error(known)
        return EXIT_ERROR
    return EXIT_OK


#: The ``--dtype`` values of the commands that load weights: ``auto`` keeps the stored dtype.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def dtype_from_name(name: str | None) -> Any:
    """The ``torch.dtype`` a ``--dtype`` value names; ``None`` for ``auto`` (or no value): as stored.

    Raises:
        ConfigError: ``name`` is none of :data:`DTYPE_NAMES`.
    """
    if name in (None, "auto"):
        return None
    if name not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {name!r} must be one of {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def resolve_device(device: str) -> Any:
    """``auto`` -> ``cuda`` when available, else ``cpu``; other names are checked (a ``torch.device``)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} asks for CUDA but no CUDA GPU is available; use --device cpu")
    return dev


def read_text_file(file: str, *, field: str, option: str, noun: str, stdin: TextIO | None = None) -> list[str]:
    """The non-empty lines of ``file``, or the ``field`` strings of a ``.jsonl`` file (``-`` reads ``stdin``).

    Args:
        file: The path given to ``option``.
        field: The key holding the text in each JSON Lines record.
        option: The command-line option, named in errors.
        noun: What the texts are, for the error about an empty file.
        stdin: Where ``-`` reads from; ``None`` refuses ``-``.

    Raises:
        FileNotFoundError: ``file`` does not exist.
        ConfigError: A JSON Lines record is malformed, the file is not UTF-8, or it holds no texts.
    """
    if file == "-" and stdin is not None:
        lines, name = stdin.read().splitlines(), "standard input"
    else:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{option} {file!r} does not exist (cwd: {Path.cwd()})")
        try:
            lines, name = path.read_text(encoding="utf-8").splitlines(), file
        except UnicodeDecodeError as err:
            raise ConfigError(f"{option} {file!r} is not UTF-8 text (byte {err.start}): save it as UTF-8") from err
    out: list[str] = []
    if file.endswith(".jsonl"):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{name}:{n} is not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ConfigError(f'{name}:{n} must be a JSON object with a "{field}" string')
            out.append(record[field])
    else:
        out.extend(line for line in lines if line.strip())
    if not out:
        raise ConfigError(f"{option} {file!r} holds no {noun}")
    return out
