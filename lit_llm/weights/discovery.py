"""Where checkpoints are and whether they are whole: every question about checkpoint files and directories.

- :func:`newest_checkpoint`: the checkpoint a run directory stands for (the highest global step, read from the name
  ``step=N`` or weights-only from the file; then ``last.ckpt``, then the newest), optionally skipping files that are
  not complete; ``--ckpt_path auto`` and ``last`` use it (:func:`auto_checkpoint`), and so do the weights readers.
- :func:`checkpoint_step`: the global step of a checkpoint without running code from it.
- :func:`run_checkpoints`: the complete checkpoints a run left in a folder.
- :func:`looks_complete` / :func:`naming_unreadable_checkpoint`: a file that is empty or truncated, and the error
  that names it with the previous good checkpoint.
- :func:`sharded_kind` / :func:`detect_kind`: whether a directory was written by FSDP or DeepSpeed, and whether it is
  complete enough to consolidate; :func:`consolidate_command` is the command that makes one file of it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.utilities.rank_zero import rank_zero_info

from lit_llm.errors import CheckpointError
from lit_llm.weights.files import TMP_SUFFIX, UNREADABLE_FILE_ERRORS, error_reason, unsupported_global

Kind = Literal["fsdp", "deepspeed"]


#: What Lightning's FSDP strategy saves besides the model and optimizer shards (its ``_METADATA_FILENAME``).
FSDP_META_FILE = "meta.pt"
DCP_INDEX = ".metadata"
DEEPSPEED_LATEST = "latest"


def sharded_kind(path: str | Path) -> Kind | None:
    """What the directory ``path`` looks like, without checking that it is complete: ``"fsdp"`` (DCP index or
    shards), ``"deepspeed"`` (a ``latest`` file or ZeRO state files), or ``None`` (neither, or not a directory)."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / DEEPSPEED_LATEST).is_file() or any(p.glob("*/*_model_states.pt")) or any(p.glob("*/*_optim_states.pt")):
        return "deepspeed"
    if (p / DCP_INDEX).is_file() or any(p.glob("*.distcp")):
        return "fsdp"
    return None


def detect_kind(path: str | Path) -> Kind:
    """Which sharded strategy wrote the checkpoint directory ``path``, after checking that it is complete.

    Args:
        path: A checkpoint directory written under FSDP (``state_dict_type: sharded``) or DeepSpeed.

    Returns:
        ``"fsdp"`` or ``"deepspeed"``.

    Raises:
        CheckpointError: ``path`` does not exist, is a file (already one checkpoint), is an unfinished save, is
            neither kind, or lacks the index its kind needs (DeepSpeed's ``latest`` and the folder it names; FSDP's
            ``.metadata`` and ``meta.pt``).
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path} does not exist (cwd: {Path.cwd()}); pass a checkpoint directory written under "
                              "FSDP or DeepSpeed, such as checkpoints/<run>/last.ckpt")
    if p.is_file():
        raise CheckpointError(f"{path} is a file, so it already is one checkpoint and there is nothing to consolidate: "
                              "pass it as it is to python -m lit_llm.generate --checkpoint, to-hf or "
                              "model.init_args.init_weights")
    kind = sharded_kind(p)
    if p.name.endswith(TMP_SUFFIX):
        final = p.with_name(p.name[: -len(TMP_SUFFIX)])
        raise CheckpointError(f"{path} is an unfinished save (a checkpoint is written as <name>{TMP_SUFFIX} and "
                              f"renamed once every rank has finished); consolidate {final} if it exists, or an "
                              "earlier checkpoint")
    if kind == "deepspeed":
        latest = p / DEEPSPEED_LATEST
        if not latest.is_file():
            raise CheckpointError(f"{path} holds DeepSpeed ZeRO files but no `latest` file naming their folder; the "
                                  "save did not finish: use an earlier checkpoint")
        tag = latest.read_text().strip()
        if not tag or not (p / tag).is_dir():
            raise CheckpointError(f"{path}: its `latest` file names the folder {tag!r}, which is missing; the save did "
                                  "not finish or the folder was moved: use an earlier checkpoint")
        return "deepspeed"
    if kind == "fsdp":
        shards = sorted(q.name for q in p.glob("*.distcp"))
        if not (p / DCP_INDEX).is_file():
            raise CheckpointError(f"{path} holds FSDP shards ({', '.join(shards[:4])}) but not their index "
                                  f"{DCP_INDEX}; the save did not finish (rank 0 writes it last): use an earlier "
                                  "checkpoint")
        if not (p / FSDP_META_FILE).is_file():
            raise CheckpointError(f"{path} has no {FSDP_META_FILE} (the hyperparameters, model config and tokenizer "
                                  "Lightning saves beside the shards); the save did not finish: use an earlier "
                                  "checkpoint")
        return "fsdp"
    found = sorted(q.name for q in p.iterdir())
    what = f"holds {', '.join(found[:10])}{' ...' if len(found) > 10 else ''}" if found else "is empty"
    raise CheckpointError(f"{path} is neither an FSDP nor a DeepSpeed checkpoint directory (it {what}); pass the "
                          f"directory Lightning wrote for one checkpoint: under FSDP it holds {DCP_INDEX}, *.distcp "
                          f"and {FSDP_META_FILE}, under DeepSpeed `latest` and the folder it names")


def suggested_output(path: str | Path) -> Path:
    """Where the consolidated file of the checkpoint directory ``path`` goes by convention: beside it, as
    ``<name>.consolidated.ckpt`` (``run/last.ckpt/`` -> ``run/last.consolidated.ckpt``)."""
    p = Path(path)
    stem = p.name[: -len(".ckpt")] if p.name.endswith(".ckpt") else p.name
    return p.with_name(f"{stem}.consolidated.ckpt")


def consolidate_command(path: str | Path) -> str:
    """The shell command that consolidates the checkpoint directory ``path`` into :func:`suggested_output`."""
    return (f"python -m lit_llm.convert consolidate {shlex.quote(str(path))} "
            f"{shlex.quote(str(suggested_output(path)))}")


def newest_checkpoint(directory: str | Path, *, resumable: bool = False) -> Path | None:
    """The checkpoint a run directory stands for: the ``*.ckpt`` (file, or directory of a sharded strategy) with the
    highest global step (:func:`checkpoint_step`); at the same step ``last.ckpt`` first, then the most recently
    written. ``None`` when it has none.

    The highest step, not the newest file: a folder can hold a newer file of a lower step (a ``last-v1.ckpt`` of a
    second run started in the same folder, a copy), and the furthest point of the run is what a resume wants.

    With ``resumable`` (``--ckpt_path auto`` and ``last``), consolidated files (weights only) are passed over, and so,
    with a log line, are files that are empty or not a complete ``torch.save`` archive (truncated or overwritten).
    Leftovers of an interrupted save (``*.ckpt.tmp``) never have the ``.ckpt`` suffix.
    """
    root = Path(directory)
    candidates = [p for p in root.glob("*.ckpt") if p.is_file() or p.is_dir()]
    if resumable:
        candidates = [p for p in candidates if not p.name.endswith(".consolidated.ckpt")]
        for path in [p for p in candidates if not looks_complete(p)]:
            rank_zero_info(f"--ckpt_path auto: skipping {path}, which is not a complete checkpoint "
                           "(empty or truncated)")
            candidates.remove(path)
    return max(candidates, key=_newest_last, default=None)


def _newest_last(path: str | os.PathLike) -> tuple[int, bool, float]:
    step = checkpoint_step(path)
    return (-1 if step is None else step, os.path.basename(path) == "last.ckpt", _mtime(path))


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The global step a checkpoint was saved at, read cheaply and without running code from the file: the
    ``step=N`` in its name, else the ``global_step`` it holds (``torch.load`` with ``weights_only=True`` and ``mmap``,
    so the tensors are not read; under FSDP from its ``meta.pt``). ``None`` when neither says (unreadable, or a
    DeepSpeed directory)."""
    named = re.search(r"step=(\d+)", os.path.basename(path))
    if named:
        return int(named.group(1))
    source = os.path.join(path, FSDP_META_FILE) if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(source) or not looks_complete(source):
        return None
    import torch

    try:
        saved = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file simply has no known step
        return None
    step = saved.get("global_step") if isinstance(saved, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _mtime(path: str | os.PathLike) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


@contextlib.contextmanager
def naming_unreadable_checkpoint(path: Any) -> Iterator[None]:
    """Turn what ``torch.load`` raises on a truncated or corrupt checkpoint into a :class:`CheckpointError` that names
    the file and the newest intact checkpoint beside it. A missing file stays a ``FileNotFoundError``."""
    try:
        yield
    except FileNotFoundError:
        raise
    except UNREADABLE_FILE_ERRORS as err:
        if "Weights only load failed" in str(err) and "Unsupported global" in str(err):
            raise CheckpointError(  # a readable file holding Python objects: not corruption
                f"checkpoint {path} holds Python objects beyond tensors and plain values ({unsupported_global(err)}), "
                "which lit_llm does not unpickle (that could run code); resume from a checkpoint your own run wrote"
            ) from err
        raise CheckpointError(
            f"could not read checkpoint {path} ({error_reason(err)}); it is truncated or corrupt (a save that was "
            f"killed, or a partial copy). {_previous_good_advice(str(path))}"
        ) from err


def looks_complete(path: str | os.PathLike) -> bool:
    """Cheap integrity check of a local checkpoint file: ``torch.save`` writes a zip archive whose directory is at its
    very end, so a truncated or overwritten file fails this without reading the tensors.

    A checkpoint directory (FSDP sharded, DeepSpeed) is complete when it holds its index: ``.metadata`` and ``meta.pt``
    (FSDP), or ``latest`` and the folder it names (DeepSpeed). lit_llm's strategies write them under a temporary
    name and rename them once every rank has finished, so an interrupted save never has the final name.
    """
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, DCP_INDEX)):
            return os.path.isfile(os.path.join(path, FSDP_META_FILE))
        latest = os.path.join(path, DEEPSPEED_LATEST)
        if os.path.isfile(latest):
            with open(latest) as f:
                return os.path.isdir(os.path.join(path, f.read().strip()))
        return False
    try:
        return os.path.getsize(path) > 0 and zipfile.is_zipfile(path)
    except OSError:
        return False


def _previous_good_advice(path: str) -> str:
    if "://" in path:
        return "Resume from an earlier checkpoint (--ckpt_path), or start fresh."
    folder = os.path.dirname(os.path.abspath(path))
    others = [p for p in glob.glob(os.path.join(folder, "*.ckpt")) if os.path.abspath(p) != os.path.abspath(path)]
    good = [p for p in others if looks_complete(p)]
    if good:
        newest = max(good, key=_newest_last)
        return (f"Previous good checkpoint in its folder: {newest}; resume from it with --ckpt_path {newest} "
                "(or --ckpt_path auto), or start fresh.")
    if others:
        return f"No intact checkpoint in its folder (also unreadable: {', '.join(sorted(others))}); start fresh."
    return "No other checkpoint in its folder; start fresh."


def auto_checkpoint(root: Path, flag: str = "auto") -> str | None:
    """``--ckpt_path auto`` (and ``last``): the furthest complete checkpoint in the run folder
    (:func:`newest_checkpoint`), or None (start fresh). The log names the file taken and its step."""
    newest = newest_checkpoint(root, resumable=True)
    if newest is None:
        rank_zero_info(f"--ckpt_path {flag}: no checkpoint in {root}: starting fresh")
        return None
    step = checkpoint_step(newest)
    at = f"global step {step}" if step is not None else "step unknown"
    rank_zero_info(f"--ckpt_path {flag}: resuming from {newest} ({at}; the highest step in {root})")
    return str(newest)


def run_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints a run left in ``folder`` (``*.ckpt``, consolidated copies and partial saves aside):
    a fresh run started there would mix its checkpoints with them."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("*.ckpt") if not p.name.endswith(".consolidated.ckpt") and looks_complete(p)]
    return sorted(found, key=_newest_last)


def check_checkpoint_path(path: str) -> None:
    """Check a ``--ckpt_path`` before anything else runs, so that a wrong one is one error naming it and the fix.

    Raises:
        CheckpointError: ``path`` does not exist, is a folder that is not a sharded checkpoint (the error names the
            checkpoint in it to pass instead), is a sharded checkpoint whose save did not finish, cannot be opened,
            or is not a complete ``torch.save`` archive (with the previous good checkpoint beside it). Remote paths
            (``s3://`` ...) are left to the reader.
    """
    if "://" in path:
        return
    p = Path(path).expanduser()
    if not p.exists():
        folder = p.parent if str(p.parent) not in ("", ".") else Path.cwd()
        newest = newest_checkpoint(folder, resumable=True) if folder.is_dir() else None
        fix = (f"the furthest checkpoint in {folder} is {newest}" if newest is not None else
               "pass an existing checkpoint file such as checkpoints/<run>/last.ckpt")
        raise CheckpointError(f"--ckpt_path {path} does not exist (cwd: {Path.cwd()}): {fix}; or resume the run in "
                              "--trainer.default_root_dir with --ckpt_path last (auto: start fresh when it has none)")
    if p.is_dir():
        if sharded_kind(p) is not None:
            if not looks_complete(p):
                detect_kind(p)  # names what is missing
            return
        newest = newest_checkpoint(p, resumable=True)
        fix = (f"pass --ckpt_path {newest} (its furthest checkpoint)" if newest is not None else
               "it holds no checkpoint; pass a checkpoint file such as checkpoints/<run>/last.ckpt")
        raise CheckpointError(f"--ckpt_path {path} is a folder, not a checkpoint: {fix}, or run with "
                              f"--trainer.default_root_dir={path} --ckpt_path last")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as err:
        raise CheckpointError(f"--ckpt_path {path} cannot be read ({err.strerror or err}): give this user read access "
                              "to it, or pass another checkpoint") from None
    if not looks_complete(p):
        raise CheckpointError(
            f"could not read checkpoint {path} (empty, or not a complete torch.save archive); it is truncated or "
            f"corrupt (a save that was killed, or a partial copy). {_previous_good_advice(str(p))}"
        )
