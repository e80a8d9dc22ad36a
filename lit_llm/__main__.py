"""``lit-llm COMMAND ...`` (and ``python -m lit_llm COMMAND ...``): one entry point for every lit_llm command.

=====================================  ===========================================================================
``lit-llm fit|validate|test|predict``  train or evaluate with a config (``python -m lit_llm.train``)
``lit-llm generate``                   continue prompts or chat with a model (``python -m lit_llm.generate``)
``lit-llm classify``                   label texts with a trained classifier (``python -m lit_llm.classify``)
``lit-llm convert``                    import, export, merge and consolidate weights (``python -m lit_llm.convert``)
``lit-llm judge``                      score instruction responses with an LLM judge (``python -m lit_llm.judge``)
``lit-llm clean``                      deduplicate, filter and check data for leakage (``python -m lit_llm.clean``)
``lit-llm evaluate``                   score a checkpoint on harness benchmarks (``python -m lit_llm.evaluate``)
``lit-llm serve``                      OpenAI-compatible server and chat page (``python -m lit_llm.serve``)
``lit-llm configs [NAME]``             list the shipped configs, or print where one is
=====================================  ===========================================================================

Each command is imported only when it is run, so ``lit-llm generate`` does not load Lightning's trainer.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from lit_llm.cli import EXIT_OK, EXIT_USAGE, entry_point, print_error, run_command
from lit_llm.errors import UsageError
from lit_llm.shipped import resolve_config, shipped_configs

#: ``lit-llm <name>`` -> the module whose ``main`` runs it; the four trainer subcommands go to ``lit_llm.train``.
COMMANDS: dict[str, str] = {
    "fit": "lit_llm.train",
    "validate": "lit_llm.train",
    "test": "lit_llm.train",
    "predict": "lit_llm.train",
    "generate": "lit_llm.generate",
    "classify": "lit_llm.classify",
    "convert": "lit_llm.convert",
    "judge": "lit_llm.judge",
    "clean": "lit_llm.clean",
    "evaluate": "lit_llm.evaluate",
    "serve": "lit_llm.serve.__main__",
}
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _usage() -> str:
    names = " | ".join([*COMMANDS, "configs"])
    return f"usage: lit-llm {{{names}}} ... (lit-llm COMMAND --help for a command's options)"


def _configs(args: Sequence[str]) -> None:
    if args:
        print(resolve_config(args[0]))
        return
    for name, path in shipped_configs().items():
        print(f"{name:32} {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lit-llm`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return EXIT_OK if args else EXIT_USAGE
    command, rest = args[0], args[1:]
    if command == "configs":
        return run_command(lambda: _configs(rest))
    if command not in COMMANDS:
        print_error(UsageError(f"unknown command {command!r}; {_usage()}"))
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[command])
    if command in TRAINER_SUBCOMMANDS:
        # ``python -m lit_llm.train`` ends the process itself on failure; pass its status on.
        try:
            module.main([command, *rest])
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, int) else 1
        return EXIT_OK
    return module.main(rest)


if __name__ == "__main__":
    entry_point(main)
