"""What a resume may change: the task's settings compared with the ones its checkpoint was trained with.

A resume (``--ckpt_path``) applies the run's config, not the checkpoint's: the learning rate and its schedule, weight
decay, betas, clipping, dropout, the ``speed`` options and the task's objective settings take the new values (the
optimizer and scheduler are adjusted after their state is restored: :class:`~lit_llm.tasks.optim.StepSchedule`).
Settings the checkpoint's weights, optimizer state or meaning depend on (the model's shape, the task, LoRA's rank,
which parameters train...) cannot change: :func:`check_resume_settings` refuses them in one line naming each.
The table of every setting is in docs/reliability.md ("Resume settings").
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.utilities.rank_zero import rank_zero_info

from lit_llm.errors import CheckpointError

#: Hyperparameter keys (dotted) of :class:`~lit_llm.tasks.base.GPTTask` a resume cannot change.
FIXED = (
    "vocab_size",
    "model.vocab_size",
    "model.context_length",
    "model.emb_dim",
    "model.n_heads",
    "model.n_layers",
    "model.qkv_bias",
    "model.bias",
    "model.tie_weights",
    "model.pad_vocab_multiple",
    "optim.decay_all",  # one or two parameter groups: the optimizer state would not fit
    "lora",  # with or without adapters
    "lora.rank",
    "lora.alpha",  # the scale the trained adapters were learned at
    "lora.targets",
)

#: Keys that have no effect on a resume (the weights come from the checkpoint): neither refused nor reported.
NO_EFFECT = ("init_weights", "model.init")

_MISSING = object()


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"learning_rate": 1}}`` -> ``{"optim.learning_rate": 1}``; a ``None`` group stays one key."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _lookup(values: dict[str, Any], key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def _shown(value: Any) -> str:
    """A value as the config spells it (``null``, ``true``, ``3.0e-4`` as ``0.0003``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if isinstance(value, (int, float)) else repr(value)


def check_resume_settings(
    saved: dict[str, Any], current: dict[str, Any], fixed: tuple[str, ...], task: str, source: str
) -> list[str]:
    """Compare the checkpoint's hyperparameters ``saved`` with the task's ``current`` ones.

    Raises:
        CheckpointError: one line naming every setting in ``fixed`` that differs (or the task class), with the fix.

    Returns:
        The settings that differ and are applied, as ``key old -> new`` (logged once by the caller).
    """
    refused = []
    saved_task = saved.get("_class_path")
    if isinstance(saved_task, str) and saved_task.rsplit(".", 1)[-1] != task.rsplit(".", 1)[-1]:
        refused.append(f"the task (model.class_path: checkpoint {saved_task}, given {task})")
    for key in fixed:
        old, new = _lookup(saved, key), _lookup(current, key)
        if old is _MISSING or new is _MISSING:
            continue  # a checkpoint written before the setting existed
        if isinstance(old, dict) or isinstance(new, dict):
            if (old is None) == (new is None):
                continue  # both set: their fields are compared one by one
        if old != new:
            refused.append(f"model.init_args.{key} (checkpoint {_shown(old)}, given {_shown(new)})")
    if refused:
        raise CheckpointError(
            f"{source} cannot resume with these settings changed: {'; '.join(refused)}. A resume keeps the "
            "model's shape, the task and its adapters; set them as the checkpoint has them (its run folder's "
            "logs/version_*/config.yaml records them), or start a new run from its weights with "
            f"--model.init_args.init_weights={source} in another folder"
        )
    old_flat, new_flat = flatten(saved), flatten(current)
    skip = set(fixed) | set(NO_EFFECT)
    return [f"{key} {_shown(old_flat[key])} -> {_shown(new_flat[key])}" for key in sorted(old_flat)
            if key in new_flat and key not in skip and old_flat[key] != new_flat[key]]


def log_applied(changes: list[str], source: str) -> None:
    if changes:
        rank_zero_info(f"Resuming {source} with this run's settings where they differ from the checkpoint's: "
                       + "; ".join(f"model.init_args.{c}" for c in changes))
