"""The pickles inside sharded checkpoint directories, read without running code from them.

A checkpoint directory of FSDP (``torch.distributed.checkpoint``, DCP) or DeepSpeed holds pickles that their own
readers unpickle with no restriction: DCP's index ``.metadata`` (``pickle.load``) and every value of its shards that
is not a tensor (``torch.load(weights_only=False)``), and DeepSpeed's ``*_model_states.pt`` / ``*_optim_states.pt``
(``torch.load(weights_only=False)``). A crafted directory would run code as soon as it is consolidated or resumed.
Here each of them is read first by a restricted reader:

- ``.metadata``: :class:`RestrictedUnpickler`, which resolves only the classes of DCP's index (those defined in
  ``torch.distributed.checkpoint.metadata`` and ``_StorageInfo``), ``torch.Size``, dtypes and layouts, ``pathlib``
  paths and a few builtin containers; the file names it lists must lie inside the directory.
- the non-tensor values of the shards: ``torch.load(weights_only=True)``.
- DeepSpeed's files: ``torch.load(weights_only=True)`` allowing, by name, the four DeepSpeed classes its engine and
  ZeRO optimizers store (loss scaler, ZeRO stage, parameter fragment address); the check loads them as inert
  stand-ins, so it needs no DeepSpeed.

Anything else is refused with a :class:`~lit_llm.errors.CheckpointError` naming the file and the global. Only a
directory that passes is handed to DCP, DeepSpeed or Lightning, whose own reads then meet nothing but those classes.
"""

from __future__ import annotations

import builtins
import collections
import io
import pathlib
import pickle
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from lit_llm.errors import CheckpointError
from lit_llm.weights.discovery import DCP_INDEX, DEEPSPEED_LATEST, sharded_kind
from lit_llm.weights.files import UNREADABLE_FILE_ERRORS, error_reason, torch_load, unsupported_global

__all__ = [
    "RestrictedUnpickler",
    "check_dcp_directory",
    "check_deepspeed_directory",
    "check_sharded_directory",
    "dcp_reader",
    "deepspeed_load",
    "inner_checkpoint_error",
    "read_dcp_metadata",
    "safe_load_planner",
]

#: What DeepSpeed pickles into its checkpoint files besides tensors and plain values (its engine's and ZeRO
#: optimizers' ``state_dict``), by the name the file refers to them.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals in ``allowed`` (``{(module, name): object}``).

    Every object a pickle builds comes from a global it names (a class to instantiate, a function to call), so a
    pickle that can only name inert data classes can build nothing but those: this is the restriction the Python
    documentation describes ("Restricting Globals"). Persistent ids, which only ``torch.save`` archives use, are
    refused as well.
    """

    def __init__(self, file: io.BufferedIOBase, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not allowed") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference, which is not allowed")


def _dcp_globals() -> dict[tuple[str, str], Any]:
    """The globals a DCP index refers to, and nothing that can act: DCP's own data classes, torch's value types."""
    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {}
    for obj in vars(metadata).values():  # Metadata, MetadataIndex, TensorStorageMetadata, ..., _MEM_FORMAT_ENCODING
        if isinstance(obj, type) and obj.__module__ == metadata.__name__:
            allowed[(obj.__module__, obj.__qualname__)] = obj
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a lookup by layout name
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout)):
            allowed[("torch", name)] = value
    for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    for name in ("set", "frozenset", "complex"):
        allowed[("builtins", name)] = getattr(builtins, name)
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


def _refused(path: Path, err: BaseException, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a {what} lit_llm reads: {error_reason(err)}; it was not unpickled, because that could run "
        "code from the file. Use a checkpoint your own run wrote (or one its author consolidated into a .ckpt file "
        "or exported as safetensors)")


def read_dcp_metadata(directory: str | Path) -> Any:
    """The index (``.metadata``) of the DCP checkpoint ``directory``, unpickled by :class:`RestrictedUnpickler`.

    Raises:
        CheckpointError: The index refers to anything but DCP's index classes, is no DCP index, or lists a file
            outside ``directory``.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(directory) / DCP_INDEX
    try:
        with path.open("rb") as f:
            metadata = RestrictedUnpickler(f, _dcp_globals()).load()
    except pickle.UnpicklingError as err:
        raise _refused(path, err, "torch.distributed.checkpoint index") from err
    except (*UNREADABLE_FILE_ERRORS, TypeError, AttributeError) as err:
        raise CheckpointError(f"could not read {path} ({error_reason(err)}); it is truncated or corrupt: use an "
                              "earlier checkpoint") from err
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not the index torch.distributed.checkpoint "
                              "writes; use a checkpoint directory written by FSDP")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        parts = PurePosixPath(str(name)).parts
        if (not isinstance(info, _StorageInfo) or not isinstance(name, str) or not parts
                or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name):
            raise CheckpointError(f"{path} lists the shard file {name!r}, which does not lie inside {directory}; "
                                  "the index is crafted or corrupt: use a checkpoint your own run wrote")
    return metadata


def dcp_reader(directory: str | Path) -> Any:
    """A ``FileSystemReader`` of ``directory`` whose index comes from :func:`read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_dcp_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(directory)


def safe_load_planner(directory: str | Path, keys: set[str] | None = None) -> Any:
    """DCP's load-everything planner (``_EmptyStateDictLoadPlanner``, restricted to ``keys``) whose non-tensor values
    are unpickled weights-only first: DCP itself reads them with ``torch.load(weights_only=False)``, which it then
    only does for bytes that passed."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    class _SafeLoadPlanner(_EmptyStateDictLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            data = value.getvalue()
            try:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                raise CheckpointError(
                    f"{directory}: its value {read_item.dest_index.fqn} is not plain data ({unsupported_global(err)}); "
                    "it was not unpickled, because that could run code from the file. Use a checkpoint your own run "
                    "wrote") from err
            super().load_bytes(read_item, io.BytesIO(data))

    return _SafeLoadPlanner(keys=keys)


def check_dcp_directory(directory: str | Path) -> None:
    """Read the index and every non-tensor value of the DCP checkpoint ``directory`` with the restricted readers
    (the tensors are not read), so that a reader without restrictions can be given it afterwards.

    Raises:
        CheckpointError: Something in it is not plain data, or it is unreadable.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    metadata = read_dcp_metadata(directory)
    values = {k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    if not values:
        return
    try:
        _load_state_dict({}, storage_reader=dcp_reader(directory), planner=safe_load_planner(directory, values),
                         no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # DCP reports a failed read as CheckpointException
        inner = inner_checkpoint_error(err)
        if inner is not None:
            raise inner from err
        raise CheckpointError(f"could not read the values of {directory} ({error_reason(err)}); a *.distcp file is "
                              "missing, truncated or from another save: use an earlier checkpoint") from err


def inner_checkpoint_error(err: BaseException) -> CheckpointError | None:
    """The CheckpointError that DCP wrapped into its ``CheckpointException`` (it collects each rank's failure)."""
    seen: set[int] = set()
    stack: list[Any] = [err]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CheckpointError):
            return e
        if isinstance(e, BaseException):
            stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += list(failures.values())
        elif isinstance(e, (list, tuple)):
            stack += list(e)
    return None


class _Inert:
    """Stand-in for a DeepSpeed class while a file is read: accepts any arguments and state, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_STAND_INS = [(type(name.rsplit(".", 1)[1], (_Inert,), {"__module__": __name__}), name) for name in DEEPSPEED_GLOBALS]


def deepspeed_load(file: Path) -> Any:
    """A DeepSpeed checkpoint file, read weights-only: the DeepSpeed objects it holds (:data:`DEEPSPEED_GLOBALS`)
    come back as inert stand-ins, anything else that is not plain data is refused.

    Raises:
        CheckpointError: The file holds other objects, or is unreadable.
    """
    with torch.serialization.safe_globals(_STAND_INS):
        return torch_load(file)


def check_deepspeed_directory(directory: str | Path) -> str:
    """Check the DeepSpeed checkpoint ``directory``: its ``latest`` file names a folder inside it, and every ``*.pt``
    file of that folder reads with :func:`deepspeed_load`.

    Returns:
        The tag (the folder's name).

    Raises:
        CheckpointError: ``latest`` points elsewhere, or a file holds other objects, or is unreadable.
    """
    root = Path(directory)
    latest = root / DEEPSPEED_LATEST
    try:
        tag = latest.read_bytes()[:4096].decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"could not read {latest} ({error_reason(err)}); use an earlier checkpoint") from err
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or not tag.isprintable():
        raise CheckpointError(f"{latest} names {tag!r}, which is not a folder inside {root}; the file is crafted or "
                              "corrupt: use a checkpoint your own run wrote")
    for file in sorted((root / tag).glob("**/*.pt")):
        if file.is_file():
            deepspeed_load(file)
    return tag


def check_sharded_directory(path: Any) -> None:
    """Check a checkpoint directory of FSDP or DeepSpeed before anything without restrictions reads it (nothing for
    files, URLs and other directories)."""
    if path is None or "://" in str(path):
        return
    kind = sharded_kind(Path(str(path)))
    if kind == "fsdp" and (Path(str(path)) / DCP_INDEX).is_file():
        check_dcp_directory(path)
    elif kind == "deepspeed" and (Path(str(path)) / DEEPSPEED_LATEST).is_file():
        check_deepspeed_directory(path)
