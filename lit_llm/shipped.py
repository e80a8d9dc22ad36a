"""The run configs (``configs/``) and callback presets (``callbacks/``) that ship with lit_llm.

In a checkout they are the top-level ``configs/`` and ``callbacks/`` folders; an installed wheel carries the same
files inside the package (``lit_llm/shipped/``, copied there when the wheel is built). Wherever lit_llm runs, a
``--config`` value that names no existing file is looked up among them, so these are the same run::

    python -m lit_llm.train fit --config configs/pretrain/quickstart.yaml   # in a checkout
    lit-llm fit --config pretrain/quickstart                                 # anywhere, from the installed package

``lit-llm configs`` lists the shipped names and ``lit-llm configs NAME`` prints where one is, to copy and edit it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lit_llm.errors import ConfigError

#: The folders that ship, relative to the repository root (and to ``lit_llm/shipped/`` in a wheel).
FOLDERS = ("configs", "callbacks")


def shipped_root() -> Path | None:
    """The folder holding ``configs/`` and ``callbacks/``: the package's ``shipped/`` in a wheel, else the checkout."""
    package = Path(__file__).resolve().parent
    for root in (package / "shipped", package.parent):
        if (root / "configs").is_dir():
            return root
    return None


def shipped_configs() -> dict[str, Path]:
    """Every shipped YAML file by its short name: ``pretrain/quickstart``, ``trainer/ddp``, ``callbacks/minimal``."""
    root = shipped_root()
    if root is None:
        return {}
    found: dict[str, Path] = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.yaml")):
            rel = path.relative_to(root / folder).with_suffix("").as_posix()
            found[rel if folder == "configs" else f"{folder}/{rel}"] = path
    return found


def resolve_config(value: str) -> str:
    """``value`` if it is a file (or an inline config), else the shipped config it names.

    ``configs/pretrain/quickstart.yaml``, ``pretrain/quickstart.yaml`` and ``pretrain/quickstart`` all name the same
    shipped file; so do ``callbacks/minimal.yaml`` and ``callbacks/minimal``.

    Raises:
        ConfigError: ``value`` is neither a file nor a shipped config's name.
    """
    if Path(value).expanduser().exists() or any(c in value for c in "\n{:") and not value.endswith((".yaml", ".yml")):
        return value
    name = value.removeprefix("./").removeprefix("configs/")
    for suffix in (".yaml", ".yml"):
        name = name.removesuffix(suffix)
    configs = shipped_configs()
    if name in configs:
        return str(configs[name])
    names = ", ".join(configs) or "none (no configs/ folder beside the package)"
    raise ConfigError(f"--config {value}: no such file (cwd: {Path.cwd()}), and no shipped config of that name. "
                      f"Shipped configs: {names}")


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with each ``--config``/``-c`` value passed through :func:`resolve_config`."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out
