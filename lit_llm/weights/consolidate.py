"""One checkpoint file from the checkpoint directory of a sharded strategy (FSDP, DeepSpeed).

Under FSDP (``state_dict_type: sharded``) and DeepSpeed, every rank writes its own part of a checkpoint, and
Lightning names the resulting *directory* like a file (``checkpoints/<run>/last.ckpt/``):

- **FSDP**: a ``torch.distributed.checkpoint`` (DCP) directory holding ``{"model": ..., "optimizer_0": ...}``
  (``.metadata`` + one ``__<rank>_0.distcp`` file per rank) and ``meta.pt`` with everything else Lightning saves
  (hyperparameters, ``model_config``, the DataModule's state with the tokenizer, loops, callbacks).
- **DeepSpeed**: a ``latest`` file naming a tag folder (Lightning's is ``checkpoint/``) with the module states
  (``*_model_states.pt``, which also hold what Lightning saves besides the weights) and the ZeRO partitions of the
  float32 master weights and optimizer state (``*_optim_states.pt``).

:func:`consolidate` writes one Lightning ``.ckpt`` in the format a single-device run writes: ``state_dict`` with the
task's plain names (``model.tok_emb.weight`` ...), ``hyper_parameters``, ``model_config`` and the DataModule state, so
that ``lit_llm.weights.readers``, ``python -m lit_llm.generate``, ``python -m lit_llm.convert to-hf`` and
``model.init_args.init_weights`` read it. The command line is ``python -m lit_llm.convert consolidate DIR OUT``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_llm.errors import CheckpointError
from lit_llm.weights.discovery import (
    FSDP_META_FILE,
    Kind,
    detect_kind,
    sharded_kind,
    suggested_output,
)
from lit_llm.weights.files import TMP_SUFFIX, UNREADABLE_FILE_ERRORS, atomic_torch_save, error_reason, torch_load
from lit_llm.weights.pickled import (
    check_deepspeed_directory,
    dcp_reader,
    deepspeed_load,
    inner_checkpoint_error,
    safe_load_planner,
)

__all__ = ["consolidate"]


log = logging.getLogger(__name__)

#: Suffix of a checkpoint still being written: lit_llm's strategies rename ``<name>.tmp`` once every rank is done.
#: Module wrappers whose names leak into parameter names: Lightning's DeepSpeed wrapper (a prefix), FSDP, activation
#: checkpointing and torch.compile (anywhere in the name).
_WRAPPER_PREFIX = "_forward_module."
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
#: What DeepSpeed's engine itself puts into ``*_model_states.pt`` beside the client (Lightning) state.
_DEEPSPEED_KEYS = frozenset({
    "module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
    "csr_tensor_module_names", "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size",
    "ds_config", "ds_version", "checkpoint_parallel_dimensions", "universal_checkpoint_info",
})
#: Entries that only resuming the training uses; Lightning's ``save_weights_only`` leaves them out too.
_TRAINING_STATE = ("optimizer_states", "lr_schedulers")


# ---- what a directory is -----------------------------------------------------------------------------------------










# ---- consolidation -----------------------------------------------------------------------------------------------


@dataclass
class _Result:
    source: Path
    out: Path
    kind: Kind
    tensors: int
    parameters: int
    dtypes: list[str]
    optimizer: str
    global_step: int | None

    def describe(self) -> str:
        size = self.out.stat().st_size
        label = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[self.kind]
        step = f", step {self.global_step}" if self.global_step is not None else ""
        return (f"wrote {self.out} ({_size(size)}): {label} checkpoint {self.source}{step}; {self.tensors} tensors, "
                f"{self.parameters:,} parameters ({', '.join(self.dtypes)}); {self.optimizer}")


def consolidate(src: str | Path, out: str | Path, *, keep_optimizer: bool = False) -> Path:
    """Write the sharded checkpoint directory ``src`` as one lit_llm ``.ckpt`` file ``out``.

    The weights come out as the strategy keeps them: DeepSpeed's float32 master weights (merged from the ZeRO
    partitions by DeepSpeed's own ``zero_to_fp32``), FSDP's parameters in their stored dtype (float32 under
    ``bf16-mixed``). Parameter names lose the wrappers' prefixes, so ``state_dict`` holds exactly what a
    single-device run saves (a tied head listed under both of its names). Everything else that was saved is kept
    (hyperparameters, ``model_config``, ``tokens_seen``, the DataModule state with the tokenizer, loops, callback
    states), except entries that are not plain data, which lit_llm's readers (``torch.load(weights_only=True)``)
    could not load: those are dropped with a warning. The file is written to ``<out>.tmp`` and renamed, so ``out``
    is never left half-written. Memory: one copy of the weights (FSDP's optimizer shards are not read unless kept).

    Args:
        src: The checkpoint directory (``checkpoints/<run>/step=000100.ckpt/``), or a run directory whose
            ``last.ckpt`` (else newest ``*.ckpt``) is one.
        out: The ``.ckpt`` file to write (its directory is created; an existing file is replaced).
        keep_optimizer: Keep the optimizer and learning-rate scheduler states, so that ``fit --ckpt_path out``
            resumes the run on any number of devices without a sharded strategy. Only FSDP checkpoints hold the
            optimizer state in a form that converts (re-keyed from parameter names to the indices a plain optimizer
            uses); DeepSpeed's flat ZeRO partitions do not, and the file then holds the weights only (with a
            warning). Without it the file is what ``ModelCheckpoint(save_weights_only=True)`` writes.

    Returns:
        ``out``.

    Raises:
        CheckpointError: ``src`` is missing, a file, not a complete FSDP/DeepSpeed checkpoint, or unreadable;
            ``out`` is a directory or lies inside ``src``; DeepSpeed is needed and not installed.
    """
    result = _consolidate(src, out, keep_optimizer=keep_optimizer)
    log.info(result.describe())
    return result.out


def _consolidate(src: str | Path, out: str | Path, *, keep_optimizer: bool) -> _Result:
    source = _resolve_source(Path(src).expanduser())
    kind = detect_kind(source)
    target = Path(out).expanduser()
    if target.is_dir():
        raise CheckpointError(f"the output {out} is a directory; pass the path of the file to write, such as "
                              f"{suggested_output(source)}")
    if target.resolve().is_relative_to(source.resolve()):
        raise CheckpointError(f"the output {out} lies inside the checkpoint directory {source}, which would then hold "
                              f"a file that is not part of the checkpoint; write it elsewhere, such as "
                              f"{suggested_output(source)}")
    if kind == "fsdp":
        checkpoint, optimizer = _read_fsdp(source, keep_optimizer)
    else:
        checkpoint, optimizer = _read_deepspeed(source, keep_optimizer)
    if optimizer != "kept":
        for key in _TRAINING_STATE:
            checkpoint.pop(key, None)
    state = checkpoint["state_dict"]
    _tie_head(state, checkpoint)
    _drop_unloadable(checkpoint, source)
    atomic_torch_save(checkpoint, target)
    tensors = [t for t in state.values() if isinstance(t, Tensor)]
    unique = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t for t in tensors}
    return _Result(
        source=source, out=target, kind=kind, tensors=len(tensors),
        parameters=sum(t.numel() for t in unique.values() if t.is_floating_point()),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        optimizer={"kept": "optimizer state kept",
                   "dropped": "optimizer state dropped (--keep-optimizer keeps it)",
                   "absent": "no optimizer state in the checkpoint",
                   "unavailable": "optimizer state not kept (DeepSpeed's partitions do not convert)"}[optimizer],
        global_step=checkpoint.get("global_step"),
    )


def _resolve_source(path: Path) -> Path:
    """A run directory stands for its newest checkpoint, when that is a directory; anything else is checked as is."""
    if not path.is_dir() or sharded_kind(path) is not None or path.name.endswith(TMP_SUFFIX):
        return path
    from lit_llm.weights.discovery import newest_checkpoint

    newest = newest_checkpoint(path)
    if newest is None:
        return path
    if newest.is_file():
        raise CheckpointError(f"{path} is a run directory whose newest checkpoint {newest} is already one file: "
                              "nothing to consolidate; pass it (or the run directory) to generate, to-hf or "
                              "init_weights as it is")
    log.info(f"{path} is a run directory: consolidating its checkpoint {newest}")
    return newest


def _read_fsdp(path: Path, keep_optimizer: bool) -> tuple[dict[str, Any], str]:
    """Lightning's FSDP checkpoint as one dict: the model (and optimizer) shards merged, ``meta.pt`` around them."""
    try:
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    except ImportError as err:  # a PyTorch build without torch.distributed
        raise CheckpointError(f"reading the FSDP checkpoint {path} needs torch.distributed.checkpoint, which this "
                              f"PyTorch build lacks ({err}); consolidate on a machine where FSDP runs") from err
    meta = torch_load(path / FSDP_META_FILE)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / FSDP_META_FILE} holds a {type(meta).__name__}, not the dict Lightning saves; "
                              "the checkpoint was not written by Lightning's FSDP strategy")
    # The index and the non-tensor values are pickles: read by restricted readers (lit_llm.weights.pickled).
    reader = dcp_reader(path)
    metadata = reader.read_metadata()
    planner_data = getattr(metadata, "planner_data", None) or {}
    tops = {str(planner_data[k][0]) if planner_data.get(k) else k.split(".", 1)[0]
            for k in metadata.state_dict_metadata}
    # The model's entry: "model" from Lightning's FSDPStrategy, "state_dict" from its ModelParallelStrategy (FSDP2).
    model_key = next((k for k in ("model", "state_dict") if k in tops), None)
    if model_key is None:
        raise CheckpointError(f"{path} holds no model shards (its entries are {', '.join(sorted(tops))}); it was not "
                              "written by Lightning's FSDP strategy")
    optimizers = sorted((t for t in tops if re.fullmatch(r"optimizer_\d+", t)), key=lambda t: int(t.split("_")[1]))
    keys = {model_key, *(optimizers if keep_optimizer else ())}
    loaded: dict[str, Any] = {}
    try:
        # DCP's own "load everything the index lists" planner, restricted to the keys wanted: the optimizer shards
        # (twice the model's size under AdamW) stay on disk unless they are kept. Lightning reads them the same way.
        _load_state_dict(loaded, storage_reader=reader, planner=safe_load_planner(path, keys), no_dist=True)
    except (Exception, CheckpointException) as err:  # DCP reports a failed read as CheckpointException
        refused = inner_checkpoint_error(err)  # a value that is not plain data
        if refused is not None:
            raise refused from err
        raise CheckpointError(f"could not read the shards of {path} ({error_reason(err)}); a *.distcp file is missing, "
                              "truncated or from another save: use an earlier checkpoint") from err
    checkpoint = dict(meta)
    split = checkpoint.pop("model_parallel", None)  # written by lit_llm.distributed's tensor / pipeline strategies
    if split:
        from lit_llm.distributed.tensor import canonical_state  # a tensor-parallel run's qkv rows back in order

        loaded = canonical_state(loaded, split)
    checkpoint["state_dict"] = {_plain_name(k): v for k, v in loaded.pop(model_key).items()}
    if not keep_optimizer:
        return checkpoint, "dropped"
    if not optimizers:
        warnings.warn(f"{path} holds no optimizer state (it was saved without one): the consolidated file holds the "
                      "weights only", stacklevel=3)
        return checkpoint, "absent"
    checkpoint["optimizer_states"] = [_indexed_optimizer_state(loaded.pop(name), path) for name in optimizers]
    return checkpoint, "kept"


def _indexed_optimizer_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """FSDP's optimizer state, keyed by parameter name, as ``Optimizer.state_dict()`` keys it: by the parameter's
    position in the parameter groups, which is how a plain optimizer (and FSDP, re-keying it) loads it again."""
    groups = state.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise CheckpointError(f"{path}: its optimizer state has no parameter groups, so it cannot be kept; "
                              "consolidate without --keep-optimizer")
    names = [p for g in groups for p in g["params"]]
    if all(isinstance(n, int) for n in names):  # already indexed (DCP stores the state's int keys as strings)
        return {**state, "state": {int(k): v for k, v in (state.get("state") or {}).items()}}
    index = {_plain_name(str(n)): i for i, n in enumerate(names)}
    by_index: dict[int, Any] = {}
    for name, value in (state.get("state") or {}).items():
        plain = _plain_name(str(name))
        if plain not in index:
            raise CheckpointError(f"{path}: the optimizer state has an entry for {plain}, which no parameter group "
                                  "lists; consolidate without --keep-optimizer")
        by_index[index[plain]] = value
    return {"state": dict(sorted(by_index.items())),
            "param_groups": [{**g, "params": [index[_plain_name(str(n))] for n in g["params"]]} for g in groups]}


def _read_deepspeed(path: Path, keep_optimizer: bool) -> tuple[dict[str, Any], str]:
    """Lightning's DeepSpeed checkpoint as one dict: DeepSpeed's ``zero_to_fp32`` merges the float32 master weights,
    and the client state (what Lightning saved besides them) comes from rank 0's model states file."""
    tag = check_deepspeed_directory(path)  # every file of it weights-only before DeepSpeed unpickles any
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        from lit_llm.distributed.deepspeed import DEEPSPEED_INSTALL

        raise CheckpointError(f"{path} is a DeepSpeed checkpoint, and merging its ZeRO partitions needs DeepSpeed, "
                              f"which is not installed: {DEEPSPEED_INSTALL} (no GPU needed to consolidate)") from err
    folder = path / tag
    states = [folder / "mp_rank_00_model_states.pt", folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    states_file = next((f for f in states if f.is_file()), None)
    if states_file is None:
        raise CheckpointError(f"{folder} has neither {states[0].name} nor {states[1].name}, where DeepSpeed keeps the "
                              "hyperparameters and tokenizer; the save did not finish: use an earlier checkpoint")
    said = io.StringIO()
    try:
        # DeepSpeed's own objects in it (ZeRO enums, loss scaler) come back as stand-ins and are dropped below with
        # the engine's other entries.
        client = deepspeed_load(states_file)
        with contextlib.redirect_stdout(said):  # zero_to_fp32 reports its progress with print()
            weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    except UNREADABLE_FILE_ERRORS as err:
        raise CheckpointError(f"could not merge the ZeRO partitions of {path} ({error_reason(err)}); a rank's "
                              "*_optim_states.pt or *_model_states.pt file is missing, truncated or from another "
                              "save: use an earlier checkpoint") from err
    for line in said.getvalue().splitlines():
        log.debug(f"zero_to_fp32: {line}")
    if not isinstance(client, dict):
        raise CheckpointError(f"{states_file} holds a {type(client).__name__}, not DeepSpeed's model states dict")
    checkpoint = {k: v for k, v in client.items() if k not in _DEEPSPEED_KEYS}
    checkpoint["state_dict"] = {_plain_name(k): v for k, v in weights.items()}
    if keep_optimizer:
        warnings.warn(f"{path}: DeepSpeed keeps the optimizer state as flat ZeRO partitions that do not convert to a "
                      "plain optimizer's state, so the consolidated file holds the weights only; resume from the "
                      "directory itself (fit --ckpt_path) under DeepSpeed to continue with it", stacklevel=3)
        return checkpoint, "unavailable"
    return checkpoint, "dropped"


# ---- assembling and writing --------------------------------------------------------------------------------------


def _plain_name(name: str) -> str:
    name = name.removeprefix(_WRAPPER_PREFIX)
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _tie_head(state: dict[str, Any], checkpoint: dict[str, Any]) -> None:
    """A tied head is one tensor under two names in a single-device checkpoint; sharded saves may list it once, or as
    a separate copy. Both names then point to the embedding, which loaders and Lightning's resume expect."""
    config = checkpoint.get("model_config") or (checkpoint.get("hyper_parameters") or {}).get("model")
    if not isinstance(config, dict) or not config.get("tie_weights"):
        return
    emb, head = state.get("model.tok_emb.weight"), state.get("model.out_head.weight")
    if isinstance(emb, Tensor) and (head is None or (isinstance(head, Tensor) and head.shape == emb.shape
                                                      and torch.equal(head, emb))):
        state["model.out_head.weight"] = emb


def _drop_unloadable(checkpoint: dict[str, Any], source: Path) -> None:
    """Remove top-level entries that ``torch.load(weights_only=True)`` refuses (each is checked on its own, in memory;
    the weights and optimizer state, built here from tensors and numbers, are not)."""
    dropped = []
    for key in [k for k in checkpoint if k not in ("state_dict", "optimizer_states")]:
        buffer = io.BytesIO()
        try:
            torch.save(checkpoint[key], buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickling or the weights-only unpickler: either way, not plain data
            dropped.append(f"{key} ({error_reason(err)})")
            del checkpoint[key]
    if dropped:
        warnings.warn(f"{source}: left out of the consolidated file, because they are not plain data that lit_llm's "
                      f"readers load: {'; '.join(dropped)}", stacklevel=4)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"
