"""A run whose data is all local touches no network: a full tiny ``fit`` of each task on local files, with every
attempt to resolve or connect to a non-loopback address recorded and refused.

The test suite sets ``HF_HUB_OFFLINE=1`` for every test (conftest.py); here it is unset (and the ``datasets``
settings read from it at import are put back to their defaults), so that what is proved is lit_llm's own doing.
"""

from __future__ import annotations

import ipaddress
import json
import socket

import datasets
import huggingface_hub.constants
import pytest

from lit_llm.data.builtin import load_builtin
from lit_llm.lightning_cli import run_training

TINY = ["--model.init_args.model.n_layers=2", "--model.init_args.model.emb_dim=32", "--model.init_args.model.n_heads=2",
        "--model.init_args.speed.compile=false"]


def _loopback(host: object) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def no_network(monkeypatch):
    """Online settings, but every DNS lookup or connection to a non-loopback address fails and is recorded."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    attempts: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def refuse(what: str) -> None:
        attempts.append(what)
        raise OSError(f"network access in a test that must not touch the network: {what}")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            refuse(f"connect {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _loopback(host):
            refuse(f"getaddrinfo {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: connect(self, address) or 0)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, *a, **k: refuse(f"create_connection {address}") if not _loopback(address[0])
                        else socket.socket().connect(address))
    return attempts


def test_the_guard_sees_the_datasets_load_counter(no_network, tmp_path):
    """The guard has teeth: ``datasets.load_dataset`` of a local text file, called directly, asks the network (its
    download counter), which is what lit_llm's loader avoids."""
    path = tmp_path / "a.txt"
    path.write_text("hello\n", encoding="utf-8")
    datasets.load_dataset("text", data_files=[str(path)], split="train", cache_dir=str(tmp_path / "hf"))
    assert no_network, "datasets no longer makes a request for a local file: the guard of these tests is untested"


def _fit(tmp_path, config: str, *extra: str) -> None:
    assert run_training(["fit", "--config", config, *TINY, f"--trainer.default_root_dir={tmp_path / 'run'}",
                         "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
                         "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
                         "--model.init_args.optim.warmup_steps=1", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
                         "--data.init_args.num_workers=0", *extra]) == 0


def test_pretrain_on_local_files_touches_no_network(no_network, tmp_path, corpus, in_repo_root):
    _fit(tmp_path, "configs/pretrain/quickstart.yaml", "--model.init_args.model.context_length=16",
         f"--data.init_args.source={corpus}", "--data.init_args.tokenizer_vocab_size=300",
         "--data.init_args.batch_size=2")
    assert no_network == []
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def test_classify_on_local_files_touches_no_network(no_network, tmp_path, in_repo_root):
    reviews = load_builtin("reviews").select(range(200)).to_pandas()
    csv = tmp_path / "reviews.csv"
    reviews.to_csv(csv, index=False)
    _fit(tmp_path, "configs/classify/quickstart.yaml", "--model.init_args.model.context_length=64",
         f"--data.init_args.source={csv}", "--data.init_args.tokenizer_vocab_size=300",
         "--data.init_args.batch_size=4", "--trainer.max_epochs=1")
    assert no_network == []


def test_instruct_on_local_files_touches_no_network(no_network, tmp_path, in_repo_root):
    records = load_builtin("instruct").select(range(200)).to_list()
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    _fit(tmp_path, "configs/instruct/quickstart.yaml", f"--data.init_args.source={path}",
         "--model.init_args.model.context_length=256",
         "--data.init_args.tokenizer_vocab_size=300", "--data.init_args.batch_size=4",
         "--model.init_args.generate_after_fit=false")
    assert no_network == []
