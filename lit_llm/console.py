"""``lit-llm COMMAND ...``: the console script, one word per command, each the same as ``python -m lit_llm.COMMAND``.

    lit-llm train fit --config configs/pretrain/quickstart.yaml
    lit-llm clean corpus/ cleaned/

"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> module with a ``main(argv)``.
COMMANDS = {
    "train": "lit_llm.train",
    "generate": "lit_llm.generate",
    "classify": "lit_llm.classify",
    "convert": "lit_llm.convert",
    "judge": "lit_llm.judge",
    "clean": "lit_llm.clean",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lit-llm COMMAND ARGS``; returns the command's exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: lit-llm COMMAND [ARGS]\n\ncommands: " + ", ".join(COMMANDS)
              + "\n\n`lit-llm COMMAND --help` tells more.")
        return 0 if args else 1
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 1
    status = importlib.import_module(COMMANDS[command]).main(rest)
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
