"""What several test modules share that is not a fixture: the repository's paths, the tiny model of quick runs,
and a helper for GPU subprocesses. (Fixtures live in ``conftest.py``; no test module imports another.)"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cuda_visible(gpus: list[int], count: int) -> str:
    """The CUDA_VISIBLE_DEVICES value for a child process that should use these indices among the ``count`` GPUs
    this process sees (which may themselves be a CUDA_VISIBLE_DEVICES selection)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    return ",".join(ids[i] for i in gpus)


SHARED_DATA = ROOT.parent / "shared" / "data"

#: The quickstart's GPT shrunk to seconds on a CPU: command-line overrides for ``lit_llm.train``.
TINY_MODEL = [
    "--model.init_args.model.n_layers=2",
    "--model.init_args.model.emb_dim=32",
    "--model.init_args.model.n_heads=2",
    "--model.init_args.speed.compile=false",
]
