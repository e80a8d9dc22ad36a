"""Build hook: the wheel carries the top-level ``configs/`` and ``callbacks/`` folders inside the package
(``lit_llm/shipped/``), so an installed lit_llm runs ``lit-llm fit --config pretrain/quickstart`` without a checkout.
Everything else about the package is in ``pyproject.toml``."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithShippedConfigs(build_py):
    def run(self) -> None:
        super().run()
        root = Path(__file__).resolve().parent
        target = Path(self.build_lib) / "lit_llm" / "shipped"
        for folder in ("configs", "callbacks"):
            if (root / folder).is_dir():
                shutil.copytree(root / folder, target / folder, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))


setup(cmdclass={"build_py": BuildWithShippedConfigs})
