"""Reading and writing tensor files with one copy of the weights in memory.

``safetensors`` files are read tensor by tensor with plain file reads (a memory map would keep every page it
touched resident), PyTorch checkpoints are memory-mapped and then copied out of the mapping, and safetensors files
are written one tensor at a time. Every failure to read becomes one :class:`~lit_llm.errors.CheckpointError`
naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_llm.errors import CheckpointError

# What ``torch.load`` raises on a truncated or corrupt file: besides the obvious ones, the weights-only unpickler
# reading garbage fails with IndexError (its stack) or KeyError (its memo), and with AttributeError or TypeError when a
# damaged byte turns one value into another type (found by tests/reliability/test_fuzz_readers.py).
UNREADABLE_FILE_ERRORS = (
    RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, AttributeError, TypeError, zipfile.BadZipFile,
    pickle.UnpicklingError,
)


#: Suffix of a file (or checkpoint directory) being written; renamed onto its final name only once complete.
TMP_SUFFIX = ".tmp"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` into ``<path>.tmp`` in the same directory, flushed to disk, then renamed over ``path``.

    A crash or a failed write at any point leaves the previous file whole (and at most a ``.tmp`` leftover). The
    rename itself is made durable by syncing the directory where the filesystem allows it.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Tensors:
    """Names and one-at-a-time access to the tensors of a file, transposed and cast to ``dtype`` as they are read."""

    def __init__(self, names: list[str], read: Callable[[str, torch.dtype | None, bool], Tensor],
                 dtype: torch.dtype | None) -> None:
        self.names = names
        self._read = read
        self._dtype = dtype

    def get(self, name: str, transpose: bool = False) -> Tensor:
        return self._read(name, self._dtype, transpose)

    @classmethod
    def from_dict(cls, state: dict[str, Tensor], dtype: torch.dtype | None) -> Tensors:
        def read(name: str, dtype: torch.dtype | None, transpose: bool) -> Tensor:
            t = state[name].t().contiguous() if transpose else state[name]
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return cls(list(state), read, dtype)

    @classmethod
    def from_safetensors(cls, path: Path, dtype: torch.dtype | None) -> Tensors:
        reader = SafetensorsReader(path)
        return cls(list(reader.header), reader.read, dtype)


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsReader:
    """Reads safetensors tensors by name with plain file reads into freshly allocated tensors.

    ``safetensors.safe_open`` memory-maps the whole file, and every page a tensor is read through stays resident
    (and counted in the process's memory) while any tensor of the file lives; tensors that need a transpose would
    then be held twice. Reading each one into its own buffer keeps exactly one copy.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with path.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if size < 8 or n > size - 8:
                    raise ValueError(f"header of {n} bytes in a {size}-byte file")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                begin, end = info["data_offsets"]
                numel = 1
                for d in info["shape"]:
                    numel *= d
                if end > size - 8 - n or end - begin != numel * _ST_DTYPES[info["dtype"]].itemsize:
                    raise ValueError(f"tensor {name} lies beyond the end of the file")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path} is not a valid safetensors file ({err}); it may be truncated or corrupt: "
                                  "download or convert it again") from err
        self.header = header
        self.offset = 8 + n
        self._scratch: Tensor | None = None

    def read(self, name: str, dtype: torch.dtype | None = None, transpose: bool = False) -> Tensor:
        """The tensor ``name``, optionally transposed and cast; always a new tensor of its own."""
        info = self.header[name]
        stored = _ST_DTYPES[info["dtype"]]
        dtype = dtype if dtype is not None and stored.is_floating_point else stored
        if not transpose and dtype == stored:
            return self._fill(torch.empty(info["shape"], dtype=stored), name)
        # The stored form goes into one reused scratch buffer: a temporary per tensor would leave the allocator's
        # heap full of freed holes between the kept tensors (measured: +0.6 GB for gpt2-1558m).
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        if self._scratch is None or self._scratch.numel() < nbytes:
            self._scratch = None
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        src = self._fill(self._scratch[:nbytes].view(stored).view(info["shape"]), name)
        return (src.t() if transpose else src).to(dtype, memory_format=torch.contiguous_format, copy=True)

    def _fill(self, t: Tensor, name: str) -> Tensor:
        begin, end = self.header[name]["data_offsets"]
        if t.numel():
            with self.path.open("rb") as f:
                f.seek(self.offset + begin)
                got = f.readinto(t.reshape(-1).view(torch.uint8).numpy())
            if got != end - begin:
                raise CheckpointError(f"{self.path} ended while reading {name}; it is truncated or corrupt: download "
                                      "or convert it again")
        return t


def write_safetensors(
    path: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], Tensor]]],
) -> None:
    """Write a safetensors file one tensor at a time (``safetensors.torch.save_file`` holds a second copy of all)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype, produce in entries:
            t = produce()
            assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, name
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    tmp.replace(path)


def torch_load(path: Path) -> Any:
    """``torch.load`` memory-mapped and with ``weights_only``; every failure becomes one CheckpointError."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files from torch < 1.6 (e.g. old pytorch_model.bin) cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} holds Python objects beyond tensors and plain values ({unsupported_global(err)}), which "
                "lit_llm does not unpickle (that could run code); if you trust it, load it yourself and torch.save its "
                "model.state_dict()"
            ) from err
        raise CheckpointError(f"could not read {path} as a PyTorch checkpoint ({error_reason(err)}); the file may be "
                              "truncated or corrupt: copy or save it again") from err
    except UNREADABLE_FILE_ERRORS as err:
        raise CheckpointError(f"could not read {path} as a PyTorch checkpoint ({error_reason(err)}); the file may be "
                              "truncated or corrupt: copy or save it again") from err


def unsupported_global(err: Exception) -> str:
    """``"it refers to builtins.exec"``: the global that torch's weights-only unpickler refused, from its message."""
    import re

    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f"it refers to {m[1]}" if m else error_reason(err)


def error_reason(err: Exception) -> str:
    """The informative line of an exception (torch's unpickler wraps it in paragraphs of advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return lines[i + 1]
    return lines[0] if lines else type(err).__name__


def own_memory(state: dict[str, Tensor]) -> None:
    """Replace tensors that live in a memory-mapped file (``torch.load(mmap=True)``) by copies read from the file.

    A model whose parameters stay in the mapping breaks when the file is rewritten in place, copy-on-write or not
    (Linux drops even private pages of a truncated file): ``generate`` would crash with a bus error when training
    overwrites its ``last.ckpt``, which Lightning does in place when its temporary directory is on another
    filesystem. Reading each tensor from the file at its offset, instead of copying it through the mapping, keeps
    the mapped pages untouched, so memory still holds one copy. Without ``/proc/self/maps`` (not Linux) tensors stay
    mapped.
    """
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return
    maps = []  # (start, end, file offset, path) of every file mapping
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            maps.append((start, end, int(parts[2], 16), parts[5]))
    for name, t in state.items():
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        hit = next((m for m in maps if m[0] <= ptr and ptr + nbytes <= m[1]), None)
        if hit is None or not nbytes or not t.is_contiguous():
            continue
        copy = torch.empty_like(t, memory_format=torch.contiguous_format)
        try:
            with open(hit[3], "rb") as f:
                f.seek(ptr - hit[0] + hit[2])
                complete = f.readinto(copy.reshape(-1).view(torch.uint8).numpy()) == nbytes
        except OSError:  # e.g. the file was deleted since ("... (deleted)")
            complete = False
        state[name] = copy if complete else t.clone()
