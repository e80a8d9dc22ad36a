"""Save and restore every random number generator, so dropout continues exactly after a resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


def capture_rng() -> dict[str, Any]:
    """The states of torch (CPU and every CUDA device), numpy and ``random``, as tensors and plain Python values
    (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the generators to ``state`` (from :func:`capture_rng`); CUDA only when the device count matches."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RNGState(pl.Callback):
    """Save the random number generators in checkpoints and restore them on resume.

    Lightning's checkpoints hold no RNG state, so after ``fit --ckpt_path`` the dropout masks (and anything else
    random) differ from an uninterrupted run. This callback captures the generators when a checkpoint is written
    (the states the next training step would start from) and, on resume, applies them at the start of the first
    training batch, after everything Lightning does in between (sanity validation, dataloader setup), so the next
    step draws exactly what it would have drawn. Nothing is captured between saves: no per-step cost.

    Under DDP Lightning writes rank 0's checkpoint, so every rank restores rank 0's states (``seed_everything``
    gives all ranks the same seed, so they were equal anyway unless something rank-specific drew from them).
    """

    def __init__(self) -> None:
        """Capture the generators with each checkpoint; restore them on resume."""
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        """The generators' states now, i.e. when the checkpoint is written."""
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved states; they are applied when the next training batch starts."""
        self._pending = state_dict["rng"]
