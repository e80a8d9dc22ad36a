"""Fuzzing the readers of model files with damaged copies of valid ones: a lit_llm ``.ckpt`` (read whole, model and
tokenizer, by ``load_model_for_inference``), ``model.safetensors`` of a converted weights directory (the same), and
``tokenizer.json`` (``load_tokenizer``, then an encode/decode round trip). Each mutated file is read or refused with
one of lit_llm's own errors (a :class:`~lit_llm.errors.LitLLMError`), never any other exception.

The default suite tries ``FAST_EXAMPLES`` files per reader; the ``slow`` variants ``SLOW_EXAMPLES`` each
(``python -m pytest -m slow tests/reliability/test_fuzz_readers.py``). The data files and archives are fuzzed the
same way in ``test_fuzz_sources.py``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
import torch  # noqa: E402
from mutations import FAST_EXAMPLES, SLOW_EXAMPLES, mutate, run_fuzz  # noqa: E402

from lit_llm.data.tokenizer import Tokenizer, load_tokenizer, train_bpe  # noqa: E402
from lit_llm.errors import LitLLMError  # noqa: E402
from lit_llm.model.config import GPTConfig  # noqa: E402
from lit_llm.model.gpt import GPTModel  # noqa: E402
from lit_llm.weights.export import save_weights  # noqa: E402
from lit_llm.weights.readers import load_model_for_inference  # noqa: E402

_SEEDS = Path(tempfile.mkdtemp(prefix="lit_llm_fuzz_seeds_"))
atexit.register(shutil.rmtree, _SEEDS, ignore_errors=True)


def _seed_files() -> dict[str, Path]:
    """A tiny GPT (1 layer, 8 wide) as a Lightning-style checkpoint with its tokenizer, and as converted weights."""
    if (_SEEDS / "seed.ckpt").is_file():
        return {"ckpt": _SEEDS / "seed.ckpt", "weights": _SEEDS / "weights"}
    tokenizer = train_bpe(["the quick brown fox jumps over the lazy dog; " * 20], vocab_size=280)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=8, emb_dim=8, n_heads=2, n_layers=1,
                       drop_rate=0.0)
    torch.manual_seed(0)
    model = GPTModel(config)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "model_config": config.to_dict(), "hyper_parameters": {}, "global_step": 3,
                "PretrainDataModule": {"tokenizer_json": tokenizer.to_json()}}, _SEEDS / "seed.ckpt")
    save_weights(config, model.state_dict(), _SEEDS / "weights", tokenizer)
    return {"ckpt": _SEEDS / "seed.ckpt", "weights": _SEEDS / "weights"}


def read_checkpoint(folder: Path, data: bytes) -> None:
    path = folder / "model.ckpt"
    path.write_bytes(data)
    load_model_for_inference(str(path))


def read_safetensors(folder: Path, data: bytes) -> None:
    weights = _seed_files()["weights"]
    for name in ("model_config.json", "tokenizer.json"):
        shutil.copy(weights / name, folder / name)
    (folder / "model.safetensors").write_bytes(data)
    load_model_for_inference(str(folder))


def read_tokenizer(folder: Path, data: bytes) -> None:
    (folder / "tokenizer.json").write_bytes(data)
    tokenizer = load_tokenizer(folder)
    assert isinstance(tokenizer, Tokenizer)
    tokenizer.decode(tokenizer.encode("the lazy dog <|endoftext|> jumps"))


READERS = {
    "checkpoint": (read_checkpoint, lambda: _seed_files()["ckpt"].read_bytes()),
    "safetensors": (read_safetensors, lambda: (_seed_files()["weights"] / "model.safetensors").read_bytes()),
    "tokenizer.json": (read_tokenizer, lambda: (_seed_files()["weights"] / "tokenizer.json").read_bytes()),
}


def check(reader: str, ops: list[tuple]) -> None:
    read, seed = READERS[reader]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            read(Path(tmp), mutate(seed(), ops))
        except LitLLMError as err:
            assert str(err)  # a message to show; its type is the contract


def test_the_seeds_read():
    for reader, (read, seed) in READERS.items():
        with tempfile.TemporaryDirectory() as tmp:
            read(Path(tmp), seed())  # the unmutated file reads: the mutations are what fails


@pytest.mark.parametrize("reader", list(READERS))
def test_mutated_files(reader):
    run_fuzz(FAST_EXAMPLES, lambda ops: check(reader, ops))


@pytest.mark.slow
@pytest.mark.parametrize("reader", list(READERS))
def test_thousands_of_mutated_files(reader):
    run_fuzz(SLOW_EXAMPLES, lambda ops: check(reader, ops))
