import os
import shutil
import tempfile
from pathlib import Path

import pytest
from support import ROOT  # noqa: E402 - shared constants and helpers live in tests/support.py

# Set before any test module imports `datasets` (which reads its cache location at import time): keep lit_llm's
# and Hugging Face's caches out of the user's home, and never reach for the Hub by accident.
_CACHE = Path(tempfile.mkdtemp(prefix="lit_llm_tests_"))
os.environ["LIT_LLM_CACHE"] = str(_CACHE / "lit_llm")
os.environ["HF_DATASETS_CACHE"] = str(_CACHE / "hf_datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


# Without a GPU, Triton kernels (lit_llm.model.fused_loss) run in Triton's CPU interpreter. Triton reads the setting
# when it is imported (torch.compile imports it), so it is set here, before any test runs.
if "TRITON_INTERPRET" not in os.environ:
    import torch  # importing torch alone does not import Triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture
def in_repo_root(monkeypatch):
    """Run from the repository root, where the shipped configs' relative paths point."""
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """4,000 characters of CPython's docs in a local file: ~16 windows of the tiny test models per epoch, so a few
    dozen optimizer steps cross epoch boundaries. A test module that needs more text defines its own ``corpus``."""
    from lit_llm.data.builtin import load_builtin

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(load_builtin("pydoc")["text"])[:4_000], encoding="utf-8")
    return path


@pytest.fixture
def ch06():
    """The book's chapter 6 module (``llms_from_scratch.ch06``), or skip: the ``llms-from-scratch`` package pulls
    TensorFlow and JupyterLab, so it is not a declared test dependency; ``pip install --no-deps llms-from-scratch``
    (plus pandas) runs these comparisons with the book's own code."""
    return pytest.importorskip("llms_from_scratch.ch06", reason="the book's package is optional: pip install --no-deps "
                               "llms-from-scratch pandas")
