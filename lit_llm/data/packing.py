"""Token windows over memory-mapped arrays, and the chunked, atomic writer that packs them.

A split is one flat ``.npy`` array of token ids. ``TokenWindows`` reads the book's sliding windows from it;
``write_npy`` concatenates tokenized rows (or arrays) into it in bounded-size chunks, through a temporary name
renamed when complete, so a killed run never leaves a file that looks finished.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset

from lit_llm.data.cache import partial_path

# Rows per read of a tokenized dataset: a batch of long documents stays well under a GB.
ROWS_PER_BATCH = 64
_COPY_CHUNK = 1 << 22  # tokens per write into the memmap: bounded RAM whatever the corpus size


def num_windows(n_tokens: int, context_length: int, stride: int) -> int:
    """Number of (inputs, targets) windows in ``n_tokens`` tokens; the book's ``range(0, n - T, stride)``."""
    if n_tokens < context_length + 1:
        return 0
    return (n_tokens - context_length - 1) // stride + 1


class TokenWindows(Dataset):
    """Sliding windows over a 1-D token array (a ``.npy`` path, memory-mapped lazily, or an array).

    Item ``i`` is ``(inputs, targets)``, int64 tensors of length ``context_length``, with
    ``targets`` equal to ``inputs`` shifted one token to the left.
    """

    def __init__(self, ids: str | Path | np.ndarray, context_length: int, stride: int) -> None:
        self.path = None if isinstance(ids, np.ndarray) else Path(ids)
        self._ids = ids if isinstance(ids, np.ndarray) else None
        self.context_length = context_length
        self.stride = stride
        self.n_tokens = len(self.ids)

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.load(self.path, mmap_mode="r")
        return self._ids

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies its data into every worker; send the path and re-map instead.
        state = self.__dict__.copy()
        if self.path is not None:
            state["_ids"] = None
        return state

    def __len__(self) -> int:
        return num_windows(self.n_tokens, self.context_length, self.stride)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.stride
        chunk = torch.from_numpy(self.ids[start : start + self.context_length + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


@dataclass
class Rows:
    """Rows of a tokenized dataset, written in order."""

    ds: datasets.Dataset
    rows: range | np.ndarray

    def n_tokens(self) -> int:
        return int(self.ds.select_columns(["n_tokens"]).with_format("numpy")[self.rows]["n_tokens"].sum())

    def chunks(self) -> Iterator[np.ndarray]:
        part = self.ds.select(self.rows)
        for batch in part.with_format("arrow").iter(batch_size=ROWS_PER_BATCH):
            yield batch.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)


Piece = Rows | np.ndarray


def _piece_len(piece: Piece) -> int:
    return len(piece) if isinstance(piece, np.ndarray) else (piece.n_tokens() if len(piece.rows) else 0)


def _piece_chunks(piece: Piece) -> Iterator[np.ndarray]:
    if isinstance(piece, np.ndarray):
        for start in range(0, len(piece), _COPY_CHUNK):
            yield piece[start : start + _COPY_CHUNK]
    elif len(piece.rows):
        yield from piece.chunks()


def write_npy(path: Path, pieces: list[Piece], dtype: type) -> int:
    """Write the concatenated pieces to ``path`` through a temp file and an atomic rename."""
    total = sum(_piece_len(p) for p in pieces)
    # Named after this process, so that the next start removes it if this one is killed (lit_llm.data.cache.sweep).
    tmp = partial_path(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
        _reserve(tmp)
        pos = 0
        for piece in pieces:
            for chunk in _piece_chunks(piece):
                out[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
        assert pos == total, f"wrote {pos} tokens, expected {total}"
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return total


def _reserve(path: Path) -> None:
    """Allocate the whole (sparse) file now: on a full disk, writing through the memory map would kill the process
    with SIGBUS, and no message; here it is an ``OSError`` (ENOSPC) naming the file."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OSError(err.errno, err.strerror, str(path)) from None
            # EOPNOTSUPP / EINVAL: a filesystem without allocation; the memory map then writes as before
