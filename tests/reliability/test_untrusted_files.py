"""Files from outside never run code: checkpoints whose pickle carries a payload, by URL, as local files, inside
FSDP and DeepSpeed directories and through every reader, end in one ``error:`` line (or one CheckpointError) and the
payload's marker file is never created.

The payload is what an attacker would ship: an object whose ``__reduce__`` makes the unpickler call ``exec``, here to
create a marker file. Every test asserts that the marker does not exist afterwards.
"""

from __future__ import annotations

import hashlib
import http.server
import pickle
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from faults import fit_args, read_losses

from lit_llm.convert import main as convert_main
from lit_llm.errors import CheckpointError
from lit_llm.train import cli, main
from lit_llm.weights.discovery import FSDP_META_FILE
from lit_llm.weights.remote import read_as_data, resolve_ckpt_path, split_sha256


class Payload:
    """Unpickling this calls ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def payload_checkpoint(path: Path, marker: Path) -> Path:
    """A file that looks like a Lightning checkpoint and carries the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model.tok_emb.weight": torch.zeros(4, 2)}, "global_step": 2,
                "pytorch-lightning_version": "2.6.6", "hyper_parameters": {}, "callbacks": Payload(marker)}, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_main(args: list[str], capsys) -> str:
    """``python -m lit_llm.train`` in process: exit status 1 and the one ``error:`` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    return one_error_line(capsys.readouterr().err)


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "the payload ran"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("LIT_LLM_CACHE", str(path))
    return path


@pytest.fixture
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving ``root``; ``requests`` lists the paths asked for."""
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            requests.append(self.path)

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_address[1]}", requests=requests)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A run folder after 2 steps of a tiny fit (last.ckpt is a genuine lit_llm checkpoint)."""
    root = tmp_path_factory.mktemp("trained")
    cli(fit_args(root, corpus, 2, []))
    assert (root / "last.ckpt").is_file()
    return root


# ---- --ckpt_path by URL ------------------------------------------------------------------------------------------


def test_a_checkpoint_url_without_its_sha256_is_refused_before_it_is_fetched(server, corpus, tmp_path, cache, marker,
                                                                             capsys, in_repo_root):
    payload_checkpoint(server.root / "x.ckpt", marker)
    url = f"{server.url}/x.ckpt"
    line = run_main(fit_args(tmp_path / "run", corpus, 4, [], f"--ckpt_path={url}"), capsys)
    assert line.startswith(f"error: CheckpointError: --ckpt_path {url} is a URL without a SHA-256")
    assert f"{url}#sha256=<64 hex digits>" in line
    assert server.requests == []


def test_a_payload_behind_its_right_sha256_is_read_as_data(server, corpus, tmp_path, cache, marker, capsys,
                                                           in_repo_root):
    """The hash only proves that the file is the one named: it is still unpickled weights-only, and refused."""
    evil = payload_checkpoint(server.root / "x.ckpt", marker)
    line = run_main(fit_args(tmp_path / "run", corpus, 4, [], f"--ckpt_path={server.url}/x.ckpt#sha256={sha256(evil)}"),
                    capsys)
    assert line.startswith("error: CheckpointError: checkpoint ") and "holds Python objects" in line
    assert "it refers to exec" in line and server.requests == ["/x.ckpt"]


def test_a_wrong_sha256_keeps_nothing(server, corpus, tmp_path, cache, marker, capsys, in_repo_root):
    payload_checkpoint(server.root / "x.ckpt", marker)
    wrong = "0" * 64
    line = run_main(fit_args(tmp_path / "run", corpus, 4, [], f"--ckpt_path={server.url}/x.ckpt#sha256={wrong}"),
                    capsys)
    assert line.startswith("error: CheckpointError: --ckpt_path: SHA-256 mismatch") and "#sha256=" in line
    assert not [p for p in (cache / "downloads").iterdir()]


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_a_genuine_checkpoint_url_with_its_sha256_resumes(trained, server, corpus, tmp_path, cache, in_repo_root):
    (server.root / "last.ckpt").write_bytes((trained / "last.ckpt").read_bytes())
    url = f"{server.url}/last.ckpt#sha256={sha256(trained / 'last.ckpt')}"
    log = {"class_path": "faults.LossLog", "init_args": {"folder": str(tmp_path / "log")}}
    c = cli(fit_args(tmp_path / "run", corpus, 4, [log], f"--ckpt_path={url}"))
    local = next((cache / "downloads").glob("*last.ckpt"))
    assert c.trainer.ckpt_path == str(local) and sha256(local) == sha256(trained / "last.ckpt")
    assert [row["step"] for row in read_losses(tmp_path / "log")] == [3, 4]  # steps 3 and 4: resumed at step 2
    cli(fit_args(tmp_path / "again", corpus, 4, [], f"--ckpt_path={url}"))  # from the cache: no second download
    assert server.requests == ["/last.ckpt"]


def test_what_ckpt_path_becomes(tmp_path, monkeypatch):
    assert split_sha256("https://h/x.ckpt#sha256=ab") == ("https://h/x.ckpt", "ab")
    assert split_sha256("https://h/x.ckpt") == ("https://h/x.ckpt", None)
    with pytest.raises(CheckpointError, match="is not a SHA-256 hex digest"):
        resolve_ckpt_path("https://h/x.ckpt#sha256=xyz")
    for registry in ("registry", "registry:my-model:latest"):
        with pytest.raises(CheckpointError, match="model registry downloads a checkpoint without verifying it"):
            resolve_ckpt_path(registry)
    monkeypatch.chdir(tmp_path)  # Lightning reads a path that begins with "http" as a URL: made absolute
    assert resolve_ckpt_path("http_runs/last.ckpt") == str(tmp_path / "http_runs/last.ckpt")
    for kept in (None, "last", "auto", "s3://bucket/last.ckpt", str(tmp_path / "x.ckpt")):
        assert resolve_ckpt_path(kept) == kept
    config = {"ckpt_path": None, "weights_only": None}
    read_as_data(config)
    assert config == {"ckpt_path": None, "weights_only": True}  # even where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set
    config = {"ckpt_path": None, "weights_only": False}
    read_as_data(config)
    assert config["weights_only"] is False  # the user's explicit choice


def test_a_local_payload_checkpoint_is_one_line(corpus, tmp_path, marker, capsys, in_repo_root):
    evil = payload_checkpoint(tmp_path / "evil.ckpt", marker)
    line = run_main(fit_args(tmp_path / "run", corpus, 4, [], f"--ckpt_path={evil}"), capsys)
    assert line.startswith(f"error: CheckpointError: checkpoint {evil} holds Python objects")


# ---- sharded checkpoint directories ------------------------------------------------------------------------------


def dcp_directory(path: Path, values: dict | None = None) -> Path:
    """A DCP checkpoint directory as Lightning's FSDP strategy writes it (shards, .metadata, meta.pt)."""
    from lightning_fabric.strategies.fsdp import _distributed_checkpoint_save

    state = {"model": {"model.tok_emb.weight": torch.ones(4, 2), **(values or {})}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        _distributed_checkpoint_save(state, path)
    torch.save({"hyper_parameters": {}, "global_step": 2}, path / FSDP_META_FILE)
    return path


def crafted_dcp(kind: str, path: Path, marker: Path) -> Path:
    if kind == "metadata":  # the index itself is the payload
        directory = dcp_directory(path)
        (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    elif kind == "value":  # a non-tensor value in a shard, which DCP unpickles with weights_only=False
        directory = dcp_directory(path, {"model.extra": Payload(marker)})
    else:  # the index lists a shard file outside the directory
        from torch.distributed.checkpoint.filesystem import FileSystemReader

        directory = dcp_directory(path)
        metadata = FileSystemReader(directory).read_metadata()  # our own file: safe to read here
        for info in metadata.storage_data.values():
            info.relative_path = "../../outside.distcp"
        (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    return directory


def crafted_deepspeed(kind: str, path: Path, marker: Path) -> Path:
    folder = path / "checkpoint"
    folder.mkdir(parents=True)
    (path / "latest").write_text("checkpoint" if kind != "latest" else "../elsewhere")
    torch.save({"module": {}, "hyper_parameters": {}}, folder / "mp_rank_00_model_states.pt")
    if kind == "states":
        torch.save({"module": {}, "hyper_parameters": {}, "ds_config": Payload(marker)},
                   folder / "mp_rank_00_model_states.pt")
    elif kind == "latest":  # `latest` leads out of the directory, to files that were never checked
        (path.parent / "elsewhere").mkdir()
        payload_checkpoint(path.parent / "elsewhere" / "mp_rank_00_model_states.pt", marker)
    elif kind == "optimizer":
        torch.save({"optimizer_state_dict": {"loss_scaler": Payload(marker)}},
                   folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    return path


CRAFTED = {
    "dcp-metadata": (crafted_dcp, "metadata", "is not a torch.distributed.checkpoint index lit_llm reads: it refers "
                                              "to builtins.exec, which is not allowed"),
    "dcp-value": (crafted_dcp, "value", "its value model.model.extra is not plain data (it refers to exec)"),
    "dcp-outside": (crafted_dcp, "outside", "lists the shard file '../../outside.distcp', which does not lie inside"),
    "deepspeed-states": (crafted_deepspeed, "states", "mp_rank_00_model_states.pt holds Python objects beyond tensors "
                                                      "and plain values (it refers to exec)"),
    "deepspeed-optimizer": (crafted_deepspeed, "optimizer", "optim_states.pt holds Python objects beyond tensors"),
    "deepspeed-latest": (crafted_deepspeed, "latest", "names '../elsewhere', which is not a folder inside"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_convert_consolidate_refuses_a_crafted_directory(case, tmp_path, marker, capsys):
    make, kind, message = CRAFTED[case]
    directory = make(kind, tmp_path / "last.ckpt", marker)
    capsys.readouterr()
    assert convert_main(["consolidate", str(directory), str(tmp_path / "one.ckpt")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: CheckpointError: ") and message in line, line
    assert not (tmp_path / "one.ckpt").exists()


@pytest.mark.parametrize("case", ["dcp-metadata", "dcp-value", "deepspeed-states"])
def test_resuming_from_a_crafted_directory_is_refused(case, corpus, tmp_path, marker, capsys, in_repo_root):
    """``fit --ckpt_path DIR``: checked before any strategy (FSDP's DCP reader, DeepSpeed's engine) reads it."""
    make, kind, message = CRAFTED[case]
    directory = make(kind, tmp_path / "crafted.ckpt", marker)
    line = run_main(fit_args(tmp_path / "run", corpus, 4, [], f"--ckpt_path={directory}"), capsys)
    assert line.startswith("error: CheckpointError: ") and message in line, line


def test_a_genuine_dcp_directory_passes_the_check(tmp_path):
    from lit_llm.weights.pickled import check_sharded_directory, read_dcp_metadata

    directory = dcp_directory(tmp_path / "ok.ckpt", {"model.step": 7, "model.names": ["a", ("b", 1.5)]})
    check_sharded_directory(directory)
    assert "model.model.tok_emb.weight" in read_dcp_metadata(directory).state_dict_metadata


# ---- every reader of a checkpoint file ----------------------------------------------------------------------------


def _readers():
    from lit_llm.classify import load_classifier
    from lit_llm.data.tokenizer_source import checkpoint_tokenizer
    from lit_llm.evaluation import load_for_evaluation
    from lit_llm.model.lora import read_lora
    from lit_llm.weights.readers import (
        build_model,
        load_book_state_dict,
        load_for_generation,
        load_hf_gpt2,
        load_lit_checkpoint,
        load_model_for_inference,
        load_weights,
    )

    def hf_dir(evil: Path) -> Path:
        directory = evil.parent / "hf"
        directory.mkdir()
        (directory / "config.json").write_text('{"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 2}')
        (directory / "pytorch_model.bin").write_bytes(evil.read_bytes())
        return directory

    return {
        "load_weights": load_weights, "load_lit_checkpoint": load_lit_checkpoint, "build_model": build_model,
        "load_model_for_inference": load_model_for_inference, "load_for_generation": load_for_generation,
        "load_classifier": load_classifier, "load_for_evaluation": lambda p: load_for_evaluation(str(p), "cpu"),
        "read_lora": read_lora, "checkpoint_tokenizer": checkpoint_tokenizer,
        "book .pth": lambda p: load_book_state_dict(p.rename(p.with_suffix(".pth"))),
        "hf pytorch_model.bin": lambda p: load_hf_gpt2(hf_dir(p)),
        "run directory": lambda p: load_weights(p.rename(p.parent / "last.ckpt").parent),
    }


@pytest.mark.parametrize("reader", list(_readers()))
def test_every_reader_refuses_a_payload(reader, tmp_path, marker):
    evil = payload_checkpoint(tmp_path / "evil" / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match=r"holds Python objects beyond tensors .*\(it refers to exec\)"):
        _readers()[reader](evil)


@pytest.mark.parametrize("command", ["generate", "classify", "to-hf", "init_weights", "data.tokenizer"])
def test_every_command_refuses_a_payload_in_one_line(command, corpus, tmp_path, marker, capsys, in_repo_root):
    from lit_llm.classify import main as classify_main
    from lit_llm.generate import main as generate_main

    evil = payload_checkpoint(tmp_path / "evil.ckpt", marker)
    capsys.readouterr()
    if command in ("init_weights", "data.tokenizer"):
        option = {"init_weights": "--model.init_args.init_weights", "data.tokenizer": "--data.init_args.tokenizer"}
        line = run_main(fit_args(tmp_path / "run", corpus, 2, [], f"{option[command]}={evil}"), capsys)
    else:
        status = {"generate": lambda: generate_main(["--checkpoint", str(evil), "--prompt", "hi"]),
                  "classify": lambda: classify_main(["--checkpoint", str(evil), "some text"]),
                  "to-hf": lambda: convert_main(["to-hf", str(evil), str(tmp_path / "hf")])}[command]()
        assert status == 1
        line = one_error_line(capsys.readouterr().err)
    assert "holds Python objects beyond tensors and plain values (it refers to exec)" in line, line
