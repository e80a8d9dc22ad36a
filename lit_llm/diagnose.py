"""Faults that are not lit_llm's own errors, told as one lit_llm error that names the cause and the fix.

The entry points (:func:`lit_llm.cli.run_command`, :func:`lit_llm.lightning_cli.run_training`) print a
:class:`~lit_llm.errors.LitLLMError` as one ``error:`` line; :func:`diagnose` extends that to classes of faults that
come from elsewhere, so that the user gets the cause and the fix instead of a traceback through a library:

- Lightning's own configuration errors: any ``MisconfigurationException``, and a ``ValueError`` / ``TypeError``
  raised while the ``Trainer`` is built from the ``trainer.*`` settings (``--trainer.strategy`` naming no strategy,
  ``--trainer.max_steps -5``, a GPU preset on a machine without a usable GPU) -> :class:`ConfigError`.
- The environment: a full disk (``ENOSPC``, or ``torch.save``'s write failure, which loses the errno), a read-only
  or unwritable folder -> :class:`StorageError` naming the file, its folder and the free space there.
- Text that is not UTF-8 (``UnicodeDecodeError``) -> :class:`DataError` with the byte offset and how to convert it.

Anything else is left alone (``None``): a bug keeps its traceback. ``LIT_LLM_DEBUG=1`` shows the traceback of these
too (the entry points re-raise).
"""

from __future__ import annotations

import difflib
import errno
import io
import os
import re
import shutil
from pathlib import Path
from types import TracebackType

from lit_llm.errors import ConfigError, DataError, LitLLMError, StorageError


def diagnose(error: BaseException) -> LitLLMError | None:
    """The lit_llm error that tells ``error`` (or an error it wraps) in one line, or ``None`` for anything else."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, LitLLMError):
            return current
        found = _translate(current)
        if found is not None:
            found.__cause__ = current
            return found
        current = current.__cause__ or current.__context__
    return None


def _translate(error: BaseException) -> LitLLMError | None:
    if _is_misconfiguration(error) or (isinstance(error, (ValueError, TypeError)) and _raised_building_trainer(error)):
        return ConfigError(_lightning_message(error))
    if isinstance(error, UnicodeDecodeError):
        return _not_utf8(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return _disk_full(error, str(error.strerror or error))
    if isinstance(error, RuntimeError) and re.search(r"PytorchStreamWriter|inline_container|file write failed",
                                                     str(error)):
        return _disk_full(error, _first_line(error))
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return _not_writable(error)
    return None


# ---- Lightning's configuration errors --------------------------------------------------------------------------------

def _is_misconfiguration(error: BaseException) -> bool:
    return any(cls.__name__ == "MisconfigurationException" for cls in type(error).__mro__)


def _frames(error: BaseException) -> list:
    frames = []
    tb: TracebackType | None = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _raised_building_trainer(error: BaseException) -> bool:
    """Raised inside ``Trainer.__init__``: one of the ``trainer.*`` settings is wrong."""
    for frame in _frames(error):
        parts = Path(frame.f_code.co_filename).parts
        if frame.f_code.co_name == "__init__" and parts[-2:] == ("trainer", "trainer.py") and any(
                "lightning" in p for p in parts):
            return True
    return False


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _lightning_message(error: BaseException) -> str:
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()).rstrip(".")
    if re.search(r"gpu backend|accelerator is not available|CUDAAccelerator|MPSAccelerator|No CUDA", message, re.I):
        import torch

        return (f"trainer.accelerator asks for a GPU, but this machine has no usable one (torch.cuda.is_available() is "
                f"{torch.cuda.is_available()}; Lightning says: {message}). Run on a GPU machine, or drop the GPU "
                "preset (--config configs/trainer/gpu.yaml) and set --trainer.accelerator=cpu (or auto)")
    strategy = re.search(r"invalid strategy name: `strategy='([^']*)'`", message)
    if strategy:
        from pytorch_lightning.strategies import StrategyRegistry

        names = StrategyRegistry.available_strategies()
        close = difflib.get_close_matches(strategy.group(1), names, n=3)
        ours = [n for n in names if n.startswith("lit_")]
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return (f"trainer.strategy={strategy.group(1)!r} is not a strategy name; {hint}lit_llm's strategies are "
                f"{', '.join(ours)} (one preset each in configs/trainer/), and Lightning's own include ddp, fsdp and "
                "deepspeed_stage_2")
    return (f"a trainer setting is invalid (Lightning says: {message}). Fix the trainer.* value it names in the config "
            "or on the command line (python -m lit_llm.train fit --help lists them)")


# ---- storage ---------------------------------------------------------------------------------------------------------

def _written_file(error: BaseException) -> str | None:
    """The file being written where ``error`` was raised: the innermost open writable file of its frames."""
    for frame in reversed(_frames(error)):
        for value in frame.f_locals.values():
            name = getattr(value, "name", None)
            mode = getattr(value, "mode", "")
            if isinstance(value, io.IOBase) and isinstance(name, str) and not name.startswith("<") and isinstance(
                    mode, str) and any(c in mode for c in "wax+"):
                return name
    return None


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"


def _free(folder: str) -> str:
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:  # a partial folder may be gone already
        existing = existing.parent
    try:
        return f"{_size(shutil.disk_usage(existing).free)} free on {existing}"
    except OSError:
        return f"the free space of {folder} is unknown"


def _disk_full(error: BaseException, what: str) -> StorageError:
    written = getattr(error, "filename", None) or _written_file(error)
    if written is None:
        return StorageError(f"a write failed because the disk is full ({what}). Free space on the disk of the run "
                            "folder (trainer.default_root_dir) and of the cache (data.cache_dir / LIT_LLM_CACHE)")
    written = os.fspath(written)
    # A file written under a temporary name (<name>.tmp, or <name>.<host>-<pid>.tmp for cache files) and renamed
    # when complete: the file of that name, if any, is still the previous whole one.
    target = re.sub(r"(\.[A-Za-z0-9]+-\d+)?\.tmp$", "", written)
    folder = os.path.dirname(os.path.abspath(target))
    if target.endswith(".ckpt"):
        kept = (f" The files already in {folder} are intact (a checkpoint is written to a temporary file and renamed "
                "only when complete)." if target != written else "")
        return StorageError(f"could not write the checkpoint {target}: the disk is full ({what}; {_free(folder)})."
                            f"{kept} To go on, free space there or set --trainer.default_root_dir to a folder on a "
                            "disk with room, then resume with --ckpt_path auto.")
    return StorageError(f"could not write the file {target}: the disk is full ({what}; {_free(folder)}). Free space "
                        "there, or move the cache (data.cache_dir / LIT_LLM_CACHE) or the run folder "
                        "(trainer.default_root_dir) to a disk with room.")


def _not_writable(error: OSError) -> StorageError:
    path = os.fspath(error.filename) if error.filename is not None else _written_file(error) or "a file"
    from lit_llm.data.sources import default_cache_dir

    cache = default_cache_dir()
    in_cache = str(path).startswith(str(cache))
    fix = ("set data.cache_dir (or the LIT_LLM_CACHE environment variable) to a writable folder" if in_cache else
           "make it writable, or choose another folder (a run writes into trainer.default_root_dir, its caches into "
           "data.cache_dir / LIT_LLM_CACHE)")
    return StorageError(f"cannot write {path}: {error.strerror or error}; {fix}.")


# ---- text ------------------------------------------------------------------------------------------------------------

def _not_utf8(error: UnicodeDecodeError) -> DataError:
    data = error.object[error.start:error.start + 8]
    return DataError(f"a text input is not UTF-8: byte {error.start} of a block read from it ({bytes(data)!r}) is "
                     f"{error.reason} (encoding {error.encoding}). Convert the file to UTF-8, e.g. `iconv -f CP1252 -t "
                     "UTF-8 FILE > FILE.utf8` (or -f UTF-16 for UTF-16 text), and read the converted file")
