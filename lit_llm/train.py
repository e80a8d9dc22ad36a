"""``python -m lit_llm.train {fit,validate,test,predict} --config configs/....yaml`` (or ``lit-llm fit ...``).

Pretraining, classification and instruction finetuning, chosen by the config's ``model`` and ``data`` classes;
``--config`` may be given more than once (a run, then a trainer preset such as ``configs/trainer/ddp.yaml``). See
:mod:`lit_llm.lightning_cli` for what the CLI adds to LightningCLI and for the exit statuses.
"""

from __future__ import annotations

import sys

from lit_llm.lightning_cli import cli, run_training

__all__ = ["cli", "main"]


def main(args: list[str] | None = None) -> None:
    """Run the CLI; any exit status but 0 ends the process with it (``SystemExit``)."""
    status = run_training(args)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
